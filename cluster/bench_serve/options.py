"""Flags of `shardserve bench serve` and their checks: argparse in, a typed `ServeBenchOptions` out.

Data flow: cluster/commands/bench.py calls `add_arguments(parser)` (cheap: no aiohttp, grpc or
matplotlib is imported to build the parser); argparse's `type=` functions below refuse a bad value of
one flag (exit code 2, `argument --rates: ...`); `to_options(args)` then checks the flags
against each other (raising `UsageError`, also exit code 2) and builds the options cli.py runs.

    --endpoint [LABEL=]URL   repeated; http(s)://host:port[/prefix] for any OpenAI-compatible server
                             (/v1/completions), grpc(s)://host:port for shardserve's gRPC API
    --rates 1,2,4,inf        requests/s (inf: all at once), or --concurrency 1,8,64 (closed loop)
    --arrival poisson        constant | poisson | gamma (with --burstiness; 1 = Poisson)
    --dataset FILE.jsonl     or lognormal lengths: --input-len / --output-len (medians), --sigma
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from urllib.parse import urlsplit

from shardserve.cluster.bench_serve.arrivals import ARRIVALS, LoadPoint, Schedule
from shardserve.cluster.bench_serve.dataset import DatasetSpec
from shardserve.cluster.bench_serve.settings import ClientSettings, Endpoint
from shardserve.cluster.bench_serve.summary import Slo

SCHEMES = ("http", "https", "grpc", "grpcs")
# Dataset flags of the lognormal workload (refused with --dataset, which sets the lengths itself)
# and their defaults: ShareGPT-like medians, as workers/bench/workload.py.
LENGTH_DEFAULTS = {"input_len": 200, "output_len": 180, "distribution": "lognormal", "sigma": 0.8, "max_len": 2048}


class UsageError(ValueError):
    """Flags that contradict each other; the CLI prints it and exits with code 2."""


@dataclass(frozen=True)
class ServeBenchOptions:
    endpoints: list[Endpoint]
    points: list[LoadPoint]
    schedule: Schedule
    dataset: DatasetSpec
    client: ClientSettings
    slo: Slo
    num_warmup: int
    out_dir: str
    plots: bool


def endpoint_arg(text: str) -> Endpoint:
    label, sep, url = text.partition("=")
    if not sep or "://" in label:
        label, url = "", text
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise argparse.ArgumentTypeError(
            f"unknown scheme {parts.scheme + '://' if parts.scheme else '(none)'} in {url!r}: use http://, "
            "https:// (an OpenAI-compatible /v1/completions) or grpc://, grpcs:// (shardserve's gRPC API)")
    if not parts.hostname:
        raise argparse.ArgumentTypeError(f"no host in {url!r}: e.g. http://127.0.0.1:8000 or grpc://127.0.0.1:9000")
    try:
        port = parts.port
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"bad port in {url!r}: {exc}") from exc
    if parts.scheme.startswith("grpc"):
        if port is None or parts.path.strip("/"):
            raise argparse.ArgumentTypeError(f"a gRPC endpoint is grpc://host:port, got {url!r}")
        target = parts.netloc
    else:
        path = parts.path.rstrip("/")
        if not path.endswith("/v1/completions"):
            path = path + "/completions" if path.endswith("/v1") else path + "/v1/completions"
        target = f"{parts.scheme}://{parts.netloc}{path}"
    return Endpoint(label or parts.netloc, parts.scheme, target)


def _number_list(text: str, flag: str) -> list[str]:
    items = [t.strip() for t in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"a comma-separated list, e.g. {flag}, got {text!r}")
    return items


def rates_arg(text: str) -> list[LoadPoint]:
    points = []
    for item in _number_list(text, "1,2,4,inf"):
        try:
            rate = float(item)
        except ValueError:
            rate = math.nan
        if not rate > 0:  # also NaN
            raise argparse.ArgumentTypeError(f"each rate must be a number > 0 (requests/s) or inf, got {item!r}")
        points.append(LoadPoint("rate", rate))
    return points


def concurrency_arg(text: str) -> list[LoadPoint]:
    points = []
    for item in _number_list(text, "1,8,64"):
        if not item.isdigit() or int(item) < 1:
            raise argparse.ArgumentTypeError(f"each concurrency must be an integer >= 1, got {item!r}")
        points.append(LoadPoint("concurrency", int(item)))
    return points


def _bounded(kind: type, low: float, name: str, strict: bool = False):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < low or (strict and value == low):
            bound = f"> {low:g}" if strict else f">= {low:g}"
            raise argparse.ArgumentTypeError(f"{name} must be a finite {kind.__name__} {bound}, got {text!r}")
        return value

    return parse


def add_arguments(q: argparse.ArgumentParser) -> None:
    q.add_argument("--endpoint", action="append", type=endpoint_arg, required=True, metavar="[LABEL=]URL",
                   help="repeat for several endpoints side by side: ours=grpc://host:9000 vllm=http://host:8001")
    q.add_argument("--model", required=True, help="the model name to send (each endpoint's served name)")
    load = q.add_mutually_exclusive_group()
    load.add_argument("--rates", type=rates_arg, default=None, help="requests/s, comma-separated; inf = all at once")
    load.add_argument("--concurrency", type=concurrency_arg, default=None, help="requests in flight, comma-separated")
    q.add_argument("--arrival", choices=ARRIVALS, default=None, help="inter-arrival times at a rate (poisson)")
    q.add_argument("--burstiness", type=_bounded(float, 0, "burstiness", strict=True), default=None,
                   help="gamma shape with --arrival gamma: < 1 burstier, 1 = Poisson, > 1 smoother (default 1)")
    q.add_argument("--num-requests", type=_bounded(int, 1, "num-requests"), default=100,
                   help="requests per load point and endpoint")
    q.add_argument("--num-warmup", type=_bounded(int, 0, "num-warmup"), default=0,
                   help="unmeasured requests sent to each endpoint first")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--dataset", default=None, metavar="FILE.jsonl",
                   help='lines {"prompt": ..., "max_tokens": N} or {"input_len": N, "output_len": M}')
    q.add_argument("--input-len", type=_bounded(int, 1, "input-len"), default=None, help="median prompt tokens (200)")
    q.add_argument("--output-len", type=_bounded(int, 1, "output-len"), default=None, help="median output tokens (180)")
    q.add_argument("--distribution", choices=("lognormal", "fixed"), default=None, help="lengths (lognormal)")
    q.add_argument("--sigma", type=_bounded(float, 0, "sigma"), default=None, help="lognormal log-space std (0.8)")
    q.add_argument("--max-len", type=_bounded(int, 4, "max-len"), default=None,
                   help="lengths clipped to this many tokens (2048)")
    q.add_argument("--prompt-format", choices=("ids", "text"), default="ids",
                   help="prompts of N tokens as token ids (exact) or as N common one-token words (close)")
    q.add_argument("--vocab-size", type=_bounded(int, 1000, "vocab-size"), default=32000,
                   help="random prompt ids stay below it: at most the served model's vocabulary")
    q.add_argument("--temperature", type=_bounded(float, 0, "temperature"), default=0.0)
    q.add_argument("--no-ignore-eos", action="store_true",
                   help="do not send ignore_eos / min_tokens (servers that refuse them); outputs may end early")
    q.add_argument("--api-key", default=None, help="sent as Authorization: Bearer KEY to every endpoint")
    q.add_argument("--timeout-s", type=_bounded(float, 0, "timeout-s", strict=True), default=600.0,
                   help="per-request limit")
    q.add_argument("--slo-ttft-ms", type=_bounded(float, 0, "slo-ttft-ms", strict=True), default=None,
                   help="goodput counts requests with TTFT at most this")
    q.add_argument("--slo-itl-ms", type=_bounded(float, 0, "slo-itl-ms", strict=True), default=None,
                   help="... and a mean inter-token latency (TPOT) at most this")
    q.add_argument("--out-dir", default="bench-serve-results", help="results.json and the PNG plots go here")
    q.add_argument("--no-plots", action="store_true", help="write the JSON only")


def to_options(args: argparse.Namespace) -> ServeBenchOptions:
    labels = [e.label for e in args.endpoint]
    if len(set(labels)) != len(labels):
        raise UsageError(f"--endpoint: labels must differ, got {', '.join(labels)} (name them: LABEL=URL)")
    if args.concurrency is not None and (args.arrival is not None or args.burstiness is not None):
        raise UsageError("--arrival / --burstiness shape the arrivals at --rates; --concurrency sends the next "
                         "request when one ends")
    arrival = args.arrival or "poisson"
    if args.burstiness is not None and arrival != "gamma":
        raise UsageError(f"--burstiness applies to --arrival gamma only (got --arrival {arrival})")
    lengths = {key: getattr(args, key) for key in LENGTH_DEFAULTS}
    if args.dataset is not None and any(v is not None for v in lengths.values()):
        given = ", ".join("--" + k.replace("_", "-") for k, v in lengths.items() if v is not None)
        raise UsageError(f"{given}: the lengths come from --dataset {args.dataset}; drop one or the other")
    lengths = {k: LENGTH_DEFAULTS[k] if v is None else v for k, v in lengths.items()}
    dataset = DatasetSpec(num_requests=args.num_requests, prompt_format=args.prompt_format,
                          vocab_size=args.vocab_size, path=args.dataset, seed=args.seed, **lengths)
    if args.num_warmup > args.num_requests:
        raise UsageError(f"--num-warmup {args.num_warmup} must be at most --num-requests {args.num_requests}")
    return ServeBenchOptions(
        endpoints=args.endpoint,
        points=args.rates or args.concurrency or [LoadPoint("rate", math.inf)],
        schedule=Schedule(arrival, 1.0 if args.burstiness is None else args.burstiness, args.seed),
        dataset=dataset,
        client=ClientSettings(model=args.model, ignore_eos=not args.no_ignore_eos, temperature=args.temperature,
                              api_key=args.api_key, timeout_s=args.timeout_s),
        slo=Slo(args.slo_ttft_ms, args.slo_itl_ms),
        num_warmup=args.num_warmup, out_dir=args.out_dir, plots=not args.no_plots,
    )

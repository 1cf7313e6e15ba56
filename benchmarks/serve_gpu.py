"""The whole serving stack (gRPC → Ray Serve → LLMServer → engine) against the engine offline, same GPUs.

    python3 benchmarks/serve_gpu.py --out $OUT                      # tp2 and dp2 on a 2-GPU machine
    python3 benchmarks/serve_gpu.py --out /tmp/o --device cpu --model dummy:tiny-llama \\
        --num-requests 16 --concurrency 4 --input-len 16 --output-len 16 --max-len 64   # CPU smoke

Per layout (`tp2`: one worker group of tensor_parallel_size 2; `dp2`: two TP=1 replicas), in order:
  1. offline: the engine on its own, same requests. tp2 = one LLMEngine with TP 2 (multiproc
     launcher); dp2 = two TP=1 engines in two processes, one GPU each, started together after both
     warmed up, each on every other request; their tok/s are summed. Each engine's max_num_seqs is
     concurrency / replicas — what one served replica has in flight — so the ratio isolates the
     serving path rather than a wider batch. Then, in the same process and before any Serve starts,
     N short requests (16 in / 32 out) one at a time through an AsyncEngine over that engine: the
     direct end-to-end latency.
  2. served: a fresh local Ray (num_gpus = torch.cuda.device_count()), Serve with its gRPC proxy, the
     app of cluster/app.py with one model (tp2: TP 2, 1 replica, a Ray worker group; dp2: 2 replicas,
     1 GPU each). Warm-up, then the same requests (token ids, `prompt_token_ids`) over
     `concurrency` GenerateStream calls in flight (grpc.aio, spread over client processes so the
     client is not the bottleneck), ignore_eos and max_tokens = each request's output length: output
     tok/s, TTFT p50/p99, served / offline (target >= 0.9); then the same short requests one at a time:
     median end-to-end latency, served minus direct = what the Serve path adds per request.
Every phase is a subprocess in its own session, so each starts on empty GPUs and a hung phase is
killed (Ray's processes die with their driver) within its share of `--time-budget-s`; the others
still run. Full logs per phase, Serve's logs and `serve_gpu.json` go under --out; the table (with the
device name) is printed last. Token counts are checked: a request that got fewer tokens than asked
counts as an error.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

APP_NAME = "shardserve-bench"
MODEL_NAME = "bench"
LAYOUTS = {"tp2": (2, 1), "dp2": (1, 2)}  # name -> (tensor_parallel_size, replicas)
LOG_TAIL_BYTES = 2 << 20
# A phase's own work stops this long before the orchestrator kills it, to leave time for teardown.
TEARDOWN_RESERVE_S = 25.0
# Every phase not yet run keeps at least this much of the budget.
MIN_PHASE_S = 60.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for serve_gpu.json and the logs")
    p.add_argument("--model", default="dummy:llama-3.1-8b", help="dummy:<shape> or a Hugging Face folder")
    p.add_argument("--layouts", default="tp2,dp2", help=f"comma-separated, of {sorted(LAYOUTS)}")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--dtype", default="auto")
    p.add_argument("--num-requests", type=int, default=512)
    p.add_argument("--concurrency", type=int, default=64, help="gRPC streams in flight (served run)")
    p.add_argument("--input-len", type=int, default=200, help="median prompt tokens (lognormal)")
    p.add_argument("--output-len", type=int, default=180, help="median output tokens (lognormal)")
    p.add_argument("--sigma", type=float, default=0.8)
    p.add_argument("--max-len", type=int, default=2048, help="prompt and output lengths are clipped to this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--latency-requests", type=int, default=20)
    p.add_argument("--latency-input-len", type=int, default=16)
    p.add_argument("--latency-output-len", type=int, default=32)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--stream-interval-ms", type=float, default=0.0, help="models[].stream_interval_ms of the app")
    p.add_argument("--client-procs", type=int, default=0, help="gRPC client processes; 0 = 4 on GPU, 1 on CPU")
    p.add_argument("--ingress-replicas", type=int, default=0, help="Ingress replicas; 0 = 2 on GPU, 1 on CPU")
    p.add_argument("--time-budget-s", type=float, default=520, help="whole run, Ray start-up included")
    # Internal: one phase, run by the orchestrator in a subprocess.
    p.add_argument("--phase", choices=["offline", "served"], help=argparse.SUPPRESS)
    p.add_argument("--layout", help=argparse.SUPPRESS)
    p.add_argument("--shard", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--phase-deadline", type=float, help=argparse.SUPPRESS)  # time.time() seconds
    args = p.parse_args(argv)
    for name in args.layouts.split(","):
        if name not in LAYOUTS:
            p.error(f"--layouts: {name!r} is not one of {sorted(LAYOUTS)}")
    if args.concurrency < 1 or args.num_requests < 1 or args.latency_requests < 1:
        p.error("--concurrency, --num-requests and --latency-requests must be >= 1")
    return args


# ---- shared by the phases ------------------------------------------------------------------


def vocab_size(model: str) -> int:
    if model.startswith("dummy:"):
        from shardserve.workers.models.dummy import dummy_config

        return dummy_config(model.removeprefix("dummy:")).vocab_size
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model).vocab_size


def workload(args: argparse.Namespace) -> list:
    """The measured requests: identical in the offline and the served run (seeded)."""
    from shardserve.workers.bench.workload import Workload

    w = Workload(args.num_requests, args.input_len, args.output_len, "lognormal", args.sigma,
                 max_len=args.max_len, seed=args.seed)
    return w.sample(vocab_size(args.model))


def warmup_workload(args: argparse.Namespace, num: int) -> list:
    from shardserve.workers.bench.workload import Workload

    w = Workload(num, args.input_len, 16, "lognormal", args.sigma, max_len=args.max_len, seed=args.seed + 99)
    return w.sample(vocab_size(args.model))


def latency_workload(args: argparse.Namespace) -> list:
    from shardserve.workers.bench.workload import Workload

    w = Workload(args.latency_requests, args.latency_input_len, args.latency_output_len, seed=args.seed + 7)
    return w.sample(vocab_size(args.model))


def model_section(args: argparse.Namespace, layout: str, max_num_seqs: int) -> dict:
    """The served model's config section; the offline engines use its EngineConfig too."""
    tp, replicas = LAYOUTS[layout]
    return {
        "name": MODEL_NAME, "source": args.model, "dtype": args.dtype, "device": args.device,
        "parallel": {"tensor_parallel_size": tp}, "replicas": replicas,
        "resources": {"num_gpus_per_worker": 1 if args.device == "cuda" else 0, "num_cpus_per_worker": 1},
        "scheduler": {"max_num_seqs": max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens},
        "stream_interval_ms": args.stream_interval_ms,
    }  # fmt: skip


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def remaining(deadline: float) -> float:
    return deadline - time.time()


def wait_for(predicate, deadline: float, what: str, poll_s: float = 0.1) -> None:
    while not predicate():
        if time.time() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(poll_s)


def device_name(device: str) -> str:
    import torch

    if device == "cuda" and torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"CPU ({os.cpu_count()} cores)"


# ---- phase 1: offline ------------------------------------------------------------------------


def offline_phase(args: argparse.Namespace) -> None:
    """One engine process: warm up, wait for the go file, run the workload (its shard), maybe latency."""
    from dataclasses import asdict, replace

    from shardserve.cluster.config import ModelSection
    from shardserve.workers.bench.runs import run_engine, run_throughput
    from shardserve.workers.engine import LLMEngine

    tp, replicas = LAYOUTS[args.layout]
    out = Path(args.out)
    max_num_seqs = max(1, args.concurrency // replicas)
    config = ModelSection.model_validate(model_section(args, args.layout, max_num_seqs)).to_engine_config()
    config = replace(config, parallel=replace(config.parallel, launcher="multiproc"))
    print(f"[offline {args.layout} shard {args.shard}] {config}", flush=True)
    start = time.time()
    engine = LLMEngine(config)
    try:
        startup_s = time.time() - start
        requests = workload(args)[args.shard :: replicas]
        run_engine(engine, warmup_workload(args, max_num_seqs))
        (out / f"ready-{args.layout}-{args.shard}").touch()
        wait_for((out / f"go-{args.layout}").exists, args.phase_deadline, "the go file (other engines' warm-up)")
        result = asdict(run_throughput(engine, requests))
        result.update(startup_s=startup_s, max_num_seqs=max_num_seqs, device=device_name(args.device))
        print(f"[offline {args.layout} shard {args.shard}] {result}", flush=True)
        _write_json(out / f"offline-{args.layout}-{args.shard}.json", result)
        if args.shard == 0:
            others = [out / f"offline-{args.layout}-{s}.json" for s in range(1, replicas)]
            wait_for(lambda: all(p.exists() for p in others), args.phase_deadline, "the other engines' runs")
            latency = direct_latency(engine, latency_workload(args))
            _write_json(out / f"direct-latency-{args.layout}.json", latency)
    finally:
        engine.shutdown()


def direct_latency(engine, requests: list) -> dict:
    """Short requests one at a time straight into an AsyncEngine over `engine` (what LLMServer runs)."""
    from shardserve.workers.async_engine import AsyncEngine
    from shardserve.workers.request import SamplingParams

    async_engine = AsyncEngine(engine)

    async def one(rid: str, r) -> dict:
        params = SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True)
        start, first, num_tokens = time.monotonic(), None, 0
        async for out in async_engine.generate(r.prompt_token_ids, params, rid):
            num_tokens = len(out.outputs[0].token_ids)
            if first is None and num_tokens:
                first = time.monotonic()
        end = time.monotonic()
        return {"e2e_s": end - start, "ttft_s": (first or end) - start, "num_tokens": num_tokens}

    async def run() -> list[dict]:
        for i, r in enumerate(requests[:2]):  # warm-up: the first request after a batch pays a graph switch
            await one(f"lat-warm-{i}", r)
        return [await one(f"lat-{i}", r) for i, r in enumerate(requests)]

    try:
        records = asyncio.run(run())
    finally:
        async_engine.shutdown()  # stops its thread and the engine (the caller's shutdown is then a no-op)
    return _latency_summary(records, "direct")


def _latency_summary(records: list[dict], path: str) -> dict:
    e2e = [r["e2e_s"] for r in records if not r.get("error")]
    return {
        "path": path, "num_requests": len(records), "num_errors": len(records) - len(e2e),
        "median_e2e_s": statistics.median(e2e) if e2e else float("nan"),
        "p90_e2e_s": percentile(e2e, 0.9),
        "median_ttft_s": statistics.median([r["ttft_s"] for r in records if not r.get("error")] or [float("nan")]),
        "records": records,
    }  # fmt: skip


# ---- phase 2: served -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def served_phase(args: argparse.Namespace) -> None:
    import ray
    import torch
    from ray import serve
    from shardserve.cluster.app import build_app, serve_options
    from shardserve.cluster.config import ServeConfig, parse_config

    out = Path(args.out)
    config = parse_config({
        "ray": {"namespace": APP_NAME},
        "http": {"host": "127.0.0.1", "port": free_port()},
        "grpc": {"port": free_port()},
        "ingress": {"num_replicas": args.ingress_replicas or (2 if args.device == "cuda" else 1)},
        "models": [model_section(args, args.layout, args.concurrency)],
    }, ServeConfig)  # fmt: skip
    num_gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    # On CPU, logical CPUs: a TP 2 group reserves 3 (driver + 2 ranks) and the ingress 1.
    num_cpus = os.cpu_count() if args.device == "cuda" else max(8, os.cpu_count() or 1)
    target = f"127.0.0.1:{config.grpc.port}"
    result: dict = {"num_gpus": num_gpus, "device": device_name(args.device)}
    t0 = time.time()
    ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, namespace=config.ray.namespace)
    try:
        result["ray_start_s"] = time.time() - t0
        serve.start(**serve_options(config))
        # Not serve.run: it waits for the app without a bound (an engine that cannot start is retried).
        serve._run(build_app(config), _blocking=False, name=APP_NAME, route_prefix="/")
        wait_app_running(args.phase_deadline)
        result["app_start_s"] = time.time() - t0 - result["ray_start_s"]
        print(f"[served {args.layout}] app up after {time.time() - t0:.1f} s", flush=True)
        requests = workload(args)
        items = [(i, r.prompt_token_ids, r.output_len) for i, r in enumerate(requests)]
        warm = [(i, r.prompt_token_ids, r.output_len) for i, r in enumerate(warmup_workload(args, args.concurrency))]
        warm_records = asyncio.run(drive(target, warm, args.concurrency, args.phase_deadline, prefix="warm"))
        result["warmup_errors"] = sum(1 for r in warm_records if r["error"])
        procs = args.client_procs or (4 if args.device == "cuda" else 1)
        records = drive_in_processes(target, items, args.concurrency, procs, args.phase_deadline)
        result["throughput"] = _throughput_summary(records)
        result["throughput"]["added"] = added_latency(records, engine_timings(records))
        print(f"[served {args.layout}] {_brief(result['throughput'])}", flush=True)
        _write_json(out / f"served-{args.layout}.json", result)  # kept if the latency run fails
        lat = [(i, r.prompt_token_ids, r.output_len) for i, r in enumerate(latency_workload(args))]
        asyncio.run(drive(target, lat[:2], 1, args.phase_deadline, prefix="lat-warm"))  # as in the direct run
        lat_records = asyncio.run(drive(target, lat, 1, args.phase_deadline, prefix="lat"))
        result["latency"] = _latency_summary(lat_records, "served")
        result["latency"]["added"] = added_latency(lat_records, engine_timings(lat_records))
        _write_json(out / f"served-{args.layout}.json", result)
    finally:
        _copy_serve_logs(out / f"serve-logs-{args.layout}")
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def wait_app_running(deadline: float) -> None:
    from ray import serve

    while True:
        app = serve.status().applications.get(APP_NAME)
        status = str(getattr(app, "status", "missing"))
        if status.endswith("RUNNING"):
            return
        if status.endswith(("DEPLOY_FAILED", "UNHEALTHY")):
            raise RuntimeError(f"Serve app {APP_NAME} is {status}: {app.message}")
        if time.time() > deadline:
            raise TimeoutError(f"Serve app {APP_NAME} still {status} at the phase deadline: {getattr(app, 'message', '')}")
        time.sleep(0.5)


def engine_timings(records: list[dict]) -> dict[str, dict]:
    """The engine's own timing of each request (LLMServer.recent_requests), from every replica
    that served one: a control call pinned by `replica_id=` (cluster/router.py)."""
    from ray import serve
    from shardserve.cluster.ingress.deployment import llm_server_name

    handle = serve.get_deployment_handle(llm_server_name(0, MODEL_NAME), app_name=APP_NAME)
    timings: dict[str, dict] = {}
    for replica in sorted({r["replica"] for r in records if r["replica"]}):
        reply = handle.recent_requests.remote(replica_id=replica).result(timeout_s=30)
        if reply["replica_id"] != replica:
            print(f"engine timings: asked replica {replica}, got {reply['replica_id']}", flush=True)
        timings.update(reply["requests"])
    return timings


def added_latency(records: list[dict], timings: dict[str, dict]) -> dict:
    """Per request, served end-to-end (client) minus the engine's end-to-end (arrival to finish)."""
    added = [r["e2e_s"] - timings[r["id"]]["engine_e2e_s"] for r in records
             if not r["error"] and (timings.get(r["id"]) or {}).get("engine_e2e_s") is not None]
    return {"num_requests": len(added), "p50_s": percentile(added, 0.5), "p99_s": percentile(added, 0.99),
            "mean_s": statistics.fmean(added) if added else float("nan")}


def _brief(t: dict) -> str:
    return (f"{t['output_tokens']} tokens in {t['elapsed_s']:.2f} s = {t['output_tokens_per_s']:.1f} tok/s, "
            f"TTFT p50 {t['p50_ttft_s'] * 1e3:.0f} ms p99 {t['p99_ttft_s'] * 1e3:.0f} ms, errors {t['num_errors']}, "
            f"added per request p50 {t['added']['p50_s'] * 1e3:.1f} ms p99 {t['added']['p99_s'] * 1e3:.1f} ms")


def _throughput_summary(records: list[dict]) -> dict:
    ok = [r for r in records if not r["error"]]
    elapsed = max(r["end"] for r in records) - min(r["start"] for r in records)
    tokens = sum(r["num_tokens"] for r in records)
    ttfts = [r["first"] - r["start"] for r in ok]
    replicas: dict[str, int] = {}
    for r in ok:
        replicas[r["replica"]] = replicas.get(r["replica"], 0) + 1
    return {
        "num_requests": len(records), "num_errors": len(records) - len(ok),
        "errors": sorted({r["error"] for r in records if r["error"]})[:10],
        "elapsed_s": elapsed, "output_tokens": tokens, "output_tokens_per_s": tokens / elapsed,
        "requests_per_s": len(ok) / elapsed,
        "p50_ttft_s": percentile(ttfts, 0.5), "p99_ttft_s": percentile(ttfts, 0.99),
        "mean_ttft_s": statistics.fmean(ttfts) if ttfts else float("nan"),
        "requests_per_replica": replicas,
    }  # fmt: skip


async def drive(target: str, items: list, concurrency: int, deadline: float, barrier=None,
                prefix: str = "bench") -> list[dict]:
    """GenerateStream every (index, token ids, output_len) item with `concurrency` calls in flight.

    Each call's request id (x-request-id) is `<prefix>-<index>`, so the engine's own timing of it
    can be matched (added_latency)."""
    import grpc
    from shardserve.cluster.proto import llm_pb2 as pb
    from shardserve.cluster.proto import llm_pb2_grpc as rpc

    async with grpc.aio.insecure_channel(target) as channel:
        stub = rpc.LLMServiceStub(channel)
        await asyncio.wait_for(channel.channel_ready(), timeout=max(1.0, remaining(deadline)))
        if barrier is not None:
            await asyncio.to_thread(barrier.wait, max(1.0, remaining(deadline)))
        slots = asyncio.Semaphore(concurrency)

        async def one(index: int, ids: list[int], output_len: int) -> dict:
            async with slots:
                params = pb.SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0)
                req = pb.GenerateRequest(model=MODEL_NAME, prompt_token_ids=pb.TokenIds(ids=ids), params=params)
                rid = f"{prefix}-{index}"
                start, first, num_tokens, replica, error = time.monotonic(), None, 0, "", None
                try:
                    if remaining(deadline) < 1.0:
                        raise TimeoutError("not sent: the phase deadline has passed")
                    metadata = (("x-request-id", rid),)
                    async for resp in stub.GenerateStream(req, timeout=remaining(deadline), metadata=metadata):
                        if first is None and resp.num_tokens:
                            first = time.monotonic()
                        num_tokens += resp.num_tokens
                        replica = resp.replica_id or replica
                except TimeoutError as err:
                    error = str(err)
                except grpc.aio.AioRpcError as err:
                    error = f"{err.code().name}: {err.details()}"
                end = time.monotonic()
                if error is None and num_tokens != output_len:
                    error = f"got {num_tokens} tokens, asked for {output_len}"
                return {"index": index, "id": rid, "start": start, "first": first or end, "end": end, "num_tokens": num_tokens,
                        "e2e_s": end - start, "ttft_s": (first or end) - start, "replica": replica, "error": error}

        return await asyncio.gather(*(one(*item) for item in items))


def _client_main(target: str, items: list, concurrency: int, deadline: float, barrier, results) -> None:
    try:
        results.put(asyncio.run(drive(target, items, concurrency, deadline, barrier)))
    except BaseException as err:  # report, never hang the parent
        results.put(f"client process failed: {err!r}")
        raise


def drive_in_processes(target: str, items: list, concurrency: int, num_procs: int, deadline: float) -> list[dict]:
    """Split the items (interleaved) and the concurrency over client processes that start together.

    time.monotonic() is one system-wide clock on Linux, so records of all processes share a time base.
    """
    import multiprocessing as mp

    num_procs = max(1, min(num_procs, concurrency, len(items)))
    if num_procs == 1:
        return asyncio.run(drive(target, items, concurrency, deadline))
    ctx = mp.get_context("spawn")  # never fork a process that runs Ray and gRPC threads
    barrier, results = ctx.Barrier(num_procs), ctx.Queue()
    procs = [
        ctx.Process(target=_client_main, daemon=True, args=(
            target, items[k::num_procs], concurrency // num_procs + (k < concurrency % num_procs),
            deadline, barrier, results))
        for k in range(num_procs)
    ]  # fmt: skip
    for proc in procs:
        proc.start()
    records: list[dict] = []
    try:
        for _ in procs:
            got = results.get(timeout=max(1.0, remaining(deadline)))
            if isinstance(got, str):
                raise RuntimeError(got)
            records.extend(got)
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
    return sorted(records, key=lambda r: r["index"])


def _copy_serve_logs(dest: Path) -> None:
    """Serve's controller, proxy and replica logs of this Ray session (the tail of big ones)."""
    try:
        import ray

        logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
        dest.mkdir(parents=True, exist_ok=True)
        for src in logs.glob("*"):
            if src.is_file():
                with src.open("rb") as f:
                    f.seek(max(0, src.stat().st_size - LOG_TAIL_BYTES))
                    (dest / src.name).write_bytes(f.read())
    except Exception as err:  # logs are a convenience; never mask the phase's own error
        print(f"could not copy Serve logs: {err!r}", file=sys.stderr)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


# ---- orchestrator ----------------------------------------------------------------------------


class Phases:
    """Runs each phase as a subprocess in its own session, within its share of the time budget."""

    def __init__(self, args: argparse.Namespace, argv: list[str], deadline: float, num_phases: int) -> None:
        self.args, self.argv, self.deadline, self.left = args, argv, deadline, num_phases
        self.out = Path(args.out)

    def timeout(self) -> float:
        """This phase's hard budget: its fair share of what is left (up to 1.25x, so a slow phase
        cannot eat the later ones), and at least MIN_PHASE_S kept for every later phase. Time a
        phase leaves unused goes to the later ones."""
        left = remaining(self.deadline)
        fair = left / max(self.left, 1)
        return max(5.0, min(left - MIN_PHASE_S * (self.left - 1), max(1.25 * fair, 90.0)))

    def start(self, phase: str, layout: str, shard: int, kill_at: float, env: dict | None = None):
        """Start one phase process; its work deadline is `kill_at` less the teardown reserve."""
        log = (self.out / f"{phase}-{layout}-{shard}.log").open("w")
        work_deadline = kill_at - min(TEARDOWN_RESERVE_S, 0.2 * (kill_at - time.time()))
        cmd = [sys.executable, os.path.abspath(__file__), *self.argv, "--phase", phase, "--layout", layout,
               "--shard", str(shard), "--phase-deadline", str(work_deadline), "--device", self.args.device]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})
        return proc, log

    def finish(self, procs: list, kill_at: float) -> list[int | None]:
        """Exit codes; a process still running at `kill_at` is killed with its whole session (None)."""
        codes: list[int | None] = []
        for proc, log in procs:
            try:
                codes.append(proc.wait(timeout=max(0.1, kill_at - time.time())))
            except subprocess.TimeoutExpired:
                codes.append(None)
                _kill_group(proc)
            log.close()
        return codes


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, num_lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-num_lines:])
    except OSError:
        return ""


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def run_offline(ph: Phases, layout: str) -> dict:
    tp, replicas = LAYOUTS[layout]
    kill_at = time.time() + ph.timeout()
    procs = []
    for shard in range(replicas):
        env = {"CUDA_VISIBLE_DEVICES": str(shard)} if replicas > 1 and ph.args.device == "cuda" else None
        procs.append(ph.start("offline", layout, shard, kill_at, env))
    try:
        ready = [ph.out / f"ready-{layout}-{s}" for s in range(replicas)]
        wait_for(lambda: all(p.exists() for p in ready) or any(p.poll() is not None for p, _ in procs),
                 kill_at - TEARDOWN_RESERVE_S, "offline engines to warm up")
        (ph.out / f"go-{layout}").touch()
    except TimeoutError:
        pass
    codes = ph.finish(procs, kill_at)
    shards = [_read(ph.out / f"offline-{layout}-{s}.json") for s in range(replicas)]
    result: dict = {"exit_codes": codes, "shards": shards, "latency": _read(ph.out / f"direct-latency-{layout}.json")}
    if all(shards):
        result["output_tokens"] = sum(s["output_tokens"] for s in shards)
        result["output_tokens_per_s"] = sum(s["output_tokens_per_s"] for s in shards)
        # Also total tokens over the slowest engine's time (<= the sum; equal when balanced).
        result["output_tokens_per_s_wall"] = result["output_tokens"] / max(s["elapsed_s"] for s in shards)
        result["device"] = shards[0]["device"]
    else:
        result["error"] = _phase_error(ph.out, "offline", layout, replicas,
                                       f"offline {layout} failed (exit codes {codes}); see offline-{layout}-*.log")
    return result


def run_served(ph: Phases, layout: str) -> dict:
    kill_at = time.time() + ph.timeout()
    codes = ph.finish([ph.start("served", layout, 0, kill_at)], kill_at)
    result = _read(ph.out / f"served-{layout}.json") or {}
    result["exit_code"] = codes[0]
    if "throughput" not in result or codes[0] != 0:
        result["error"] = _phase_error(ph.out, "served", layout, 1,
                                       f"served {layout} failed (exit code {codes[0]}); see served-{layout}-0.log")
    return result


def _fmt(value, spec: str = ",.1f", scale: float = 1.0) -> str:
    return "-" if value is None or value != value else format(value * scale, spec)


def table(report: dict) -> str:
    lines = [f"device: {report['device']}   model: {report['model']}   requests: {report['num_requests']} "
             f"(lognormal medians {report['input_len']}/{report['output_len']}, sigma {report['sigma']}), "
             f"served concurrency {report['concurrency']}"]
    head = (f"{'layout':<7}{'offline tok/s':>14}{'served tok/s':>14}{'ratio':>7}{'TTFT p50 ms':>12}"
            f"{'TTFT p99 ms':>12}{'errors':>8}{'direct e2e ms':>15}{'served e2e ms':>15}{'added ms':>10}"
            f"{'req added p50/p99 ms':>22}")
    lines += [head, "-" * len(head)]
    for layout, r in report["layouts"].items():
        off, srv = r.get("offline", {}), r.get("served", {})
        thr = srv.get("throughput", {})
        added = thr.get("added") or {}
        d_lat = (off.get("latency") or {}).get("median_e2e_s")
        s_lat = (srv.get("latency") or {}).get("median_e2e_s")
        lines.append(
            f"{layout:<7}{_fmt(off.get('output_tokens_per_s')):>14}{_fmt(thr.get('output_tokens_per_s')):>14}"
            f"{_fmt(r.get('ratio'), '.3f'):>7}{_fmt(thr.get('p50_ttft_s'), '.0f', 1e3):>12}"
            f"{_fmt(thr.get('p99_ttft_s'), '.0f', 1e3):>12}{thr.get('num_errors', '-'):>8}"
            f"{_fmt(d_lat, '.1f', 1e3):>15}{_fmt(s_lat, '.1f', 1e3):>15}{_fmt(r.get('added_latency_s'), '.1f', 1e3):>10}"
            f"{_fmt(added.get('p50_s'), '.1f', 1e3) + ' / ' + _fmt(added.get('p99_s'), '.1f', 1e3):>22}"
        )
        failed = f"served run: {thr['num_errors']} requests failed: {thr['errors']}" if thr.get("num_errors") else None
        for err in (off.get("error"), srv.get("error"), failed, r.get("skipped")):
            if err:
                lines.append(f"        {err}")
    lines.append("ratio = served / offline output tok/s (target >= 0.9); added = median e2e of "
                 f"{report['latency_requests']} requests ({report['latency_input_len']} in / "
                 f"{report['latency_output_len']} out) at concurrency 1, gRPC through Serve minus AsyncEngine direct; "
                 "req added = per request of the throughput run, client e2e minus the engine's own e2e")
    return "\n".join(lines)


def run_phase(args: argparse.Namespace) -> int:
    """One phase process. Whatever ends it early leaves its reason in its own log (stdout) and in
    `error-<phase>-<layout>-<shard>.txt`, which the orchestrator puts into serve_gpu.json: a
    traceback for an exception, and a dump of every thread's stack shortly before the orchestrator
    would kill a hung phase."""
    faulthandler.enable(file=sys.stdout)
    if args.phase_deadline is not None:
        faulthandler.dump_traceback_later(max(1.0, args.phase_deadline - time.time() + 5), exit=False, file=sys.stdout)
    print(f"[{args.phase} {args.layout} shard {args.shard}] pid {os.getpid()}, "
          f"{remaining(args.phase_deadline or time.time()):.0f} s to its deadline", flush=True)
    try:
        (offline_phase if args.phase == "offline" else served_phase)(args)
    except BaseException:  # noqa: BLE001 -- reported, then the exit code says it failed
        text = traceback.format_exc()
        print(f"[{args.phase} {args.layout} shard {args.shard}] FAILED\n{text}", flush=True)
        _write_text(Path(args.out) / f"error-{args.phase}-{args.layout}-{args.shard}.txt", text)
        return 1
    finally:
        faulthandler.cancel_dump_traceback_later()
    return 0


def _write_text(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError as err:
        print(f"could not write {path}: {err!r}", flush=True)


def _phase_error(out: Path, phase: str, layout: str, shards: int, what: str) -> str:
    """`what`, plus the last line of each failed shard's traceback (full text in its error file)."""
    reasons = []
    for shard in range(shards):
        path = out / f"error-{phase}-{layout}-{shard}.txt"
        if path.exists():
            lines = path.read_text(errors="replace").strip().splitlines()
            reasons.append(f"shard {shard}: {lines[-1] if lines else '?'} (see {path.name})")
    return "; ".join([what, *reasons])


def main() -> int:
    argv = sys.argv[1:]
    args = parse_args(argv)
    if args.phase is not None:
        return run_phase(args)
    deadline = time.time() + args.time_budget_s
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    num_gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("ready-*"), *out.glob("go-*"), *out.glob("offline-*.json"), *out.glob("served-*.json"),
                  *out.glob("direct-latency-*.json"), *out.glob("error-*.txt")]:
        stale.unlink()
    layouts = args.layouts.split(",")
    report: dict = {k: getattr(args, k) for k in (
        "model", "num_requests", "concurrency", "input_len", "output_len", "sigma", "max_len", "seed",
        "latency_requests", "latency_input_len", "latency_output_len", "max_num_batched_tokens", "device")}
    report.update(device=device_name(args.device), num_gpus=num_gpus, layouts={})
    ph = Phases(args, argv, deadline, 2 * len(layouts))
    for layout in layouts:
        tp, replicas = LAYOUTS[layout]
        entry: dict = report["layouts"].setdefault(layout, {})
        if args.device == "cuda" and num_gpus < tp * replicas:
            entry["skipped"] = f"{layout} needs {tp * replicas} GPUs, this machine has {num_gpus}"
            ph.left -= 2
            continue
        for phase in ("offline", "served"):
            t0 = time.time()
            print(f"== {phase} {layout} (timeout {ph.timeout():.0f} s, {remaining(deadline):.0f} s left)", flush=True)
            entry[phase] = run_offline(ph, layout) if phase == "offline" else run_served(ph, layout)
            ph.left -= 1
            status = entry[phase].get("error") or "ok"
            print(f"   {phase} {layout}: {status} in {time.time() - t0:.0f} s", flush=True)
            if entry[phase].get("error"):
                print(_tail(out / f"{phase}-{layout}-0.log"), flush=True)
        off = entry["offline"].get("output_tokens_per_s")
        srv = entry["served"].get("throughput", {}).get("output_tokens_per_s")
        entry["ratio"] = srv / off if off and srv else None
        d_lat = (entry["offline"].get("latency") or {}).get("median_e2e_s")
        s_lat = (entry["served"].get("latency") or {}).get("median_e2e_s")
        entry["added_latency_s"] = s_lat - d_lat if d_lat is not None and s_lat is not None else None
        _write_json(out / "serve_gpu.json", report)
    name = next((e[p]["device"] for e in report["layouts"].values() for p in ("offline", "served")
                 if e.get(p, {}).get("device")), None)
    report["device"] = name or report["device"]
    _write_json(out / "serve_gpu.json", report)
    text = table(report)
    (out / "table.txt").write_text(text + "\n")
    print(text, flush=True)
    ok = all(e.get("ratio") is not None and e.get("added_latency_s") is not None or e.get("skipped")
             for e in report["layouts"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

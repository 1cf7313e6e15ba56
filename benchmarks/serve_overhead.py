"""What the Serve path costs, on CPU: real Ray, real Serve, real gRPC proxy, a synthetic engine.

    python benchmarks/serve_overhead.py                         # 64 streams, 20 ms steps
    python benchmarks/serve_overhead.py --step-ms 10 --host-ms 2 --ingress-replicas 2

Why: the GPU run (benchmarks/NOTES.md, "Serve path") delivered half of the engine's offline
throughput. Reproducing that needs an engine that produces tokens at a GPU-like rate on a machine
without one: tests/doubles/synthetic_engine.py steps every `--step-ms` (holding the GIL for
`--host-ms` of it, split in `--syncs` pieces like a TP driver talking to its ranks) and is run by
the real AsyncEngine inside the real LLMServer. Phases:
  1. offline: the SyntheticEngine alone, the same requests, max_num_seqs = concurrency: tok/s;
  2. served: a local Ray + Serve + gRPC proxy with the app of cluster/app.py; a warm-up, then
     `--concurrency` GenerateStream calls in flight from a client process. Reported: delivered
     tok/s, the engine's own tok/s over the same window (so "delivered / produced" and
     "produced while served / offline" separate a slow path from a slowed engine), gRPC messages
     per request, TTFT, and per request the added latency = client e2e − engine e2e (the engine's
     RequestMetrics, read back from LLMServer.recent_requests by request id), median and p99,
     plus CPU seconds per 1k tokens of each Serve process (proxy, Ingress, LLMServer).
Results go to --out/serve_overhead.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

# The SyntheticEngine is a test double (tests/doubles/), passed to build_app from Python.
TESTS = Path(__file__).resolve().parents[1] / "tests"
APP_NAME = "serve-overhead"
MODEL = "synthetic"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/serve_overhead")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--num-requests", type=int, default=192)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--step-ms", type=float, default=20.0, help="engine step wall time")
    p.add_argument("--host-ms", type=float, default=4.0, help="of which the engine holds the GIL")
    p.add_argument("--syncs", type=int, default=4, help="GIL release/re-acquire points per step")
    p.add_argument("--ingress-replicas", type=int, default=None, help="default: the config's default")
    p.add_argument("--num-cpus", type=int, default=8, help="logical CPUs of the local Ray")
    p.add_argument("--timeout-s", type=float, default=300.0)
    return p.parse_args(argv)


def source(args: argparse.Namespace) -> str:
    return f"synthetic:step_ms={args.step_ms},host_ms={args.host_ms},syncs={args.syncs}"


def requests(args: argparse.Namespace, num: int, seed: int = 0) -> list[tuple[str, list[int], int]]:
    """(request id, prompt token ids, output length); fixed lengths so every run is comparable."""
    return [(f"so-{seed}-{i}", [(i * 31 + j) % 30_000 + 1 for j in range(args.input_len)], args.output_len)
            for i in range(num)]


# ---- offline --------------------------------------------------------------------------------


def offline(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(TESTS))
    from doubles.synthetic_engine import SyntheticEngine, SyntheticTiming
    from shardserve.workers.request import SamplingParams

    engine = SyntheticEngine(SyntheticTiming.parse(source(args)), max_num_seqs=args.concurrency)
    for rid, ids, out_len in requests(args, args.num_requests):
        engine.add_request(rid, ids, SamplingParams(max_tokens=out_len, ignore_eos=True))
    start = time.monotonic()
    while engine.has_unfinished_requests():
        engine.step()
    elapsed = time.monotonic() - start
    return {"output_tokens": engine.total_generation_tokens, "elapsed_s": elapsed, "steps": engine.num_steps,
            "output_tokens_per_s": engine.total_generation_tokens / elapsed}


# ---- client ---------------------------------------------------------------------------------


async def drive(target: str, items: list, concurrency: int, timeout_s: float) -> list[dict]:
    import grpc
    from shardserve.cluster.proto import llm_pb2 as pb
    from shardserve.cluster.proto import llm_pb2_grpc as rpc

    async with grpc.aio.insecure_channel(target) as channel:
        stub = rpc.LLMServiceStub(channel)
        await asyncio.wait_for(channel.channel_ready(), timeout=30)
        slots = asyncio.Semaphore(concurrency)

        async def one(rid: str, ids: list[int], out_len: int) -> dict:
            async with slots:
                params = pb.SamplingParams(max_tokens=out_len, ignore_eos=True, temperature=0)
                req = pb.GenerateRequest(model=MODEL, prompt_token_ids=pb.TokenIds(ids=ids), params=params)
                start, first, tokens, messages, error = time.monotonic(), None, 0, 0, None
                try:
                    async for resp in stub.GenerateStream(req, timeout=timeout_s, metadata=(("x-request-id", rid),)):
                        messages += 1
                        if first is None and resp.num_tokens:
                            first = time.monotonic()
                        tokens += resp.num_tokens
                except grpc.aio.AioRpcError as err:
                    error = f"{err.code().name}: {err.details()}"
                end = time.monotonic()
                if error is None and tokens != out_len:
                    error = f"got {tokens} tokens, asked for {out_len}"
                return {"id": rid, "start": start, "first": first or end, "end": end, "tokens": tokens,
                        "messages": messages, "error": error}

        return await asyncio.gather(*(one(*item) for item in items))


def _client(target: str, items: list, concurrency: int, timeout_s: float, results) -> None:
    results.put(asyncio.run(drive(target, items, concurrency, timeout_s)))


def drive_in_process(target: str, items: list, concurrency: int, timeout_s: float) -> list[dict]:
    """The client in its own process, so its CPU is not the Ray driver's (nor counted as Serve's)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_client, args=(target, items, concurrency, timeout_s, results), daemon=True)
    proc.start()
    try:
        return results.get(timeout=timeout_s + 30)
    finally:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()


# ---- CPU of the Serve processes -------------------------------------------------------------


def serve_processes() -> dict[str, list]:
    """Ray sets worker process titles (`ray::ProxyActor`, `ray::ServeReplica:<app>:<deployment>`)."""
    import psutil

    found: dict[str, list] = {}
    for proc in psutil.process_iter(["cmdline"]):
        title = " ".join(proc.info["cmdline"] or [])
        for key in ("ProxyActor", "ServeController", ":Ingress", ":LLMServer"):
            if title.startswith("ray::") and key in title:
                found.setdefault(key.strip(":"), []).append(proc)
    return found


def cpu_seconds(procs: dict[str, list]) -> dict[str, float]:
    out = {}
    for key, group in procs.items():
        total = 0.0
        for proc in group:
            try:
                t = proc.cpu_times()
                total += t.user + t.system
            except Exception:  # noqa: BLE001 -- a process that went away counts what it had
                pass
        out[key] = total
    return out


# ---- served ---------------------------------------------------------------------------------


def deployment_configs() -> dict[str, dict]:
    """Each deployment's live config as the Serve controller reports it (not our constants)."""
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    deployments = details["applications"][APP_NAME]["deployments"]
    return {name: {"max_ongoing_requests": d["deployment_config"]["max_ongoing_requests"],
                   "num_replicas": len(d.get("replicas") or [])} for name, d in deployments.items()}


def served(args: argparse.Namespace) -> dict:
    import ray
    from ray import serve
    from shardserve.cluster.app import build_app, serve_options
    from shardserve.cluster.config import ServeConfig, parse_config
    from shardserve.cluster.ingress.deployment import llm_server_name
    sys.path.insert(0, str(TESTS))
    from doubles import engine_factory, synthetic_engine
    from ports import free_port

    http_port = free_port()
    cfg: dict = {
        "http": {"host": "127.0.0.1", "port": http_port},
        "grpc": {"port": free_port(taken=(http_port,))},
        "models": [{"name": MODEL, "source": source(args),
                    "resources": {"num_cpus_per_worker": 1},
                    "scheduler": {"max_num_seqs": args.concurrency}}],
    }
    if args.ingress_replicas is not None:
        cfg["ingress"] = {"num_replicas": args.ingress_replicas}
    config = parse_config(cfg, ServeConfig)
    target = f"127.0.0.1:{config.grpc.port}"
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, namespace=APP_NAME)
    try:
        serve.start(**serve_options(config))
        serve.run(build_app(config, engine_factory(synthetic_engine)), name=APP_NAME, route_prefix="/")
        result: dict = {"deployments": deployment_configs()}
        drive_in_process(target, requests(args, args.concurrency, seed=1)[:args.concurrency], args.concurrency, 60)
        handle = serve.get_deployment_handle(llm_server_name(0, MODEL), app_name=APP_NAME)
        before_stats = handle.stats.remote().result(timeout_s=30)
        procs = serve_processes()
        cpu0 = cpu_seconds(procs)
        records = drive_in_process(target, requests(args, args.num_requests), args.concurrency, args.timeout_s)
        cpu1 = cpu_seconds(procs)
        after_stats = handle.stats.remote().result(timeout_s=30)
        engine_side = handle.recent_requests.remote().result(timeout_s=30)["requests"]
        result.update(summarize(records, engine_side, before_stats, after_stats))
        tokens = max(1, result["delivered_tokens"])
        result["cpu_s_per_1k_tokens"] = {k: (cpu1[k] - cpu0[k]) * 1000 / tokens for k in cpu1}
        result["cpu_share_of_one_core"] = {k: (cpu1[k] - cpu0[k]) / result["elapsed_s"] for k in cpu1}
        return result
    finally:
        serve.shutdown()
        ray.shutdown()


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")


def summarize(records: list[dict], engine_side: dict, before: dict, after: dict) -> dict:
    ok = [r for r in records if not r["error"]]
    elapsed = max(r["end"] for r in records) - min(r["start"] for r in records)
    delivered = sum(r["tokens"] for r in records)
    produced = after["total_generation_tokens"] - before["total_generation_tokens"]
    added = [r["end"] - r["start"] - engine_side[r["id"]]["engine_e2e_s"] for r in ok
             if engine_side.get(r["id"], {}).get("engine_e2e_s") is not None]
    return {
        "num_requests": len(records), "num_errors": len(records) - len(ok),
        "errors": sorted({r["error"] for r in records if r["error"]})[:5],
        "elapsed_s": elapsed, "delivered_tokens": delivered, "delivered_tokens_per_s": delivered / elapsed,
        "produced_tokens": produced, "produced_tokens_per_s": produced / elapsed,
        "messages_per_request": statistics.fmean(r["messages"] for r in ok) if ok else float("nan"),
        "p50_ttft_s": percentile([r["first"] - r["start"] for r in ok], 0.5),
        "p99_ttft_s": percentile([r["first"] - r["start"] for r in ok], 0.99),
        "num_added_latency": len(added),
        "p50_added_latency_s": percentile(added, 0.5), "p99_added_latency_s": percentile(added, 0.99),
    }  # fmt: skip


def main() -> int:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"args": vars(args), "offline": offline(args)}
    print(f"offline: {report['offline']['output_tokens_per_s']:.0f} tok/s", flush=True)
    report["served"] = s = served(args)
    report["served_over_offline"] = s["delivered_tokens_per_s"] / report["offline"]["output_tokens_per_s"]
    (out / "serve_overhead.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(s["deployments"]))
    print(f"delivered {s['delivered_tokens_per_s']:.0f} tok/s, produced while served {s['produced_tokens_per_s']:.0f}, "
          f"offline {report['offline']['output_tokens_per_s']:.0f} -> served/offline {report['served_over_offline']:.3f}; "
          f"errors {s['num_errors']} {s['errors']}")
    print(f"messages/request {s['messages_per_request']:.1f}; TTFT p50 {s['p50_ttft_s'] * 1e3:.0f} ms "
          f"p99 {s['p99_ttft_s'] * 1e3:.0f} ms; added latency p50 {s['p50_added_latency_s'] * 1e3:.1f} ms "
          f"p99 {s['p99_added_latency_s'] * 1e3:.1f} ms (n={s['num_added_latency']})")
    print("CPU s per 1k tokens:", {k: round(v, 3) for k, v in s["cpu_s_per_1k_tokens"].items()},
          "cores busy:", {k: round(v, 2) for k, v in s["cpu_share_of_one_core"].items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Burst: N concurrent requests at once, half of the clients giving up early, over HTTP and gRPC.

    .venv/bin/shardserve serve configs/cpu-default.yaml &
    .venv/bin/python benchmarks/burst.py --url http://127.0.0.1:8000 --grpc 127.0.0.1:9000 --requests 300

Issue 20's scenario against a running app: `--requests` chat requests (max_tokens 16) sent at once;
every odd client abandons after `--abandon-s` (a timeout mid-request, or a stream closed after its
first event); then the same over gRPC (GenerateStream, odd calls cancelled). The app may answer
only 200 / OK or 429 / RESOURCE_EXHAUSTED (each 429 in OpenAI's error shape with Retry-After).
Afterwards the replica must be the same one (no restart: `x-shardserve-replica` of a request
before and after), the engine idle with no KV block held (GET /v1/stats), and the next request
answered at once. The admitted (200) requests' latency is reported (p50 / p99 / max: the queue
bound is what keeps it bounded). The last line is a JSON summary; exit 1 when an invariant failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from typing import Any

import grpc
import httpx
from shardserve.cluster.proto import llm_pb2 as pb
from shardserve.cluster.proto import llm_pb2_grpc as rpc
from soak import settle  # benchmarks/ is on sys.path when a script there runs


async def http_burst(
    args: argparse.Namespace, client: httpx.AsyncClient
) -> tuple[Counter, list[str], list[float]]:
    """Outcomes, malformed-429 problems, and the latency (s) of each request answered 200."""
    url = args.url + "/v1/chat/completions"
    problems: list[str] = []
    latencies: list[float] = []

    async def one(i: int) -> str:
        body = {"model": args.model, "messages": [{"role": "user", "content": f"Say hello to number {i}."}],
                "max_tokens": args.max_tokens, "stream": i % 4 == 1}  # fmt: skip
        if i % 2:  # an impatient client: gives up mid-request or after the first streamed event
            try:
                async with asyncio.timeout(args.abandon_s):
                    async with client.stream("POST", url, json=body) as resp:
                        async for _ in resp.aiter_lines():
                            break
                        return f"abandoned after {resp.status_code}"
            except TimeoutError:
                return "abandoned"
        start = time.monotonic()
        resp = await client.post(url, json=body)
        if resp.status_code == 200:
            latencies.append(time.monotonic() - start)
        if resp.status_code == 429:
            error = resp.json().get("error") or {}
            if error.get("type") != "rate_limit_error" or int(resp.headers.get("retry-after", "0")) < 1:
                problems.append(f"429 without the OpenAI shape or Retry-After: {resp.text[:200]}")
        return str(resp.status_code)

    return Counter(await asyncio.gather(*(one(i) for i in range(args.requests)))), problems, latencies


async def grpc_burst(args: argparse.Namespace) -> Counter:
    async with grpc.aio.insecure_channel(args.grpc) as channel:
        stub = rpc.LLMServiceStub(channel)

        async def one(i: int) -> str:
            request = pb.GenerateRequest(model=args.model, prompt=f"Count to {i}:",
                                         params=pb.SamplingParams(max_tokens=args.max_tokens))  # fmt: skip
            call = stub.GenerateStream(request)
            try:
                if i % 2:
                    try:
                        async with asyncio.timeout(args.abandon_s):
                            async for _ in call:
                                break
                    except TimeoutError:
                        pass
                    call.cancel()
                    return "abandoned"
                async for _ in call:
                    pass
                return "OK"
            except grpc.aio.AioRpcError as err:
                return err.code().name

        return Counter(await asyncio.gather(*(one(i) for i in range(args.requests))))


def percentiles(values: list[float]) -> dict[str, float]:
    """p50 / p99 / max of the admitted (200) requests' latencies: the queue bound bounds them."""
    if not values:
        return {}
    ordered = sorted(values)
    pick = lambda q: round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)  # noqa: E731
    return {"p50": pick(0.5), "p99": pick(0.99), "max": round(ordered[-1], 2)}


async def probe(args: argparse.Namespace, client: httpx.AsyncClient) -> tuple[str, float]:
    """One small request: (replica that served it, seconds)."""
    start = time.monotonic()
    resp = await client.post(args.url + "/v1/completions", timeout=60,
                             json={"model": args.model, "prompt": "The capital of France is", "max_tokens": 4})  # fmt: skip
    resp.raise_for_status()
    return resp.headers["x-shardserve-replica"], time.monotonic() - start


async def run(args: argparse.Namespace) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=args.requests + 8, max_keepalive_connections=args.requests + 8)
    async with httpx.AsyncClient(limits=limits, timeout=300) as client:
        replica_before, _ = await probe(args, client)
        summary: dict[str, Any] = {"requests": args.requests, "abandon_s": args.abandon_s}
        ok = True
        for protocol in args.protocols.split(","):
            start = time.monotonic()
            latencies: list[float] = []
            if protocol == "http":
                outcomes, problems, latencies = await http_burst(args, client)
                allowed = {"200", "429", "abandoned", "abandoned after 200", "abandoned after 429"}
            else:
                outcomes, problems = await grpc_burst(args), []
                allowed = {"OK", "RESOURCE_EXHAUSTED", "abandoned"}
            seconds = time.monotonic() - start
            idle, _ = await settle(client, args.url, args.model)
            replica_after, next_s = await probe(args, client)
            checks = {
                "only_allowed_outcomes": set(outcomes) <= allowed,
                "no_malformed_429": not problems,
                "same_replica": replica_after == replica_before,
                "idle_no_kv_held": idle,
                "next_request_at_once": next_s < args.next_request_s,
            }
            ok = ok and all(checks.values())
            summary[protocol] = {"outcomes": dict(outcomes), "seconds": round(seconds, 1),
                                 "next_request_s": round(next_s, 2), "checks": checks, "problems": problems[:3],
                                 "admitted_latency_s": percentiles(latencies)}  # fmt: skip
        summary["ok"] = ok
        return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="HTTP base URL (with the app's route prefix)")
    parser.add_argument("--grpc", default="127.0.0.1:9000", help="gRPC target host:port")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--abandon-s", type=float, default=0.2)
    parser.add_argument("--protocols", default="http,grpc", help="comma-separated: http, grpc")
    parser.add_argument("--next-request-s", type=float, default=10.0, help="bound on the request after the burst")
    args = parser.parse_args(argv)
    if args.requests < 2 or args.max_tokens < 1 or args.abandon_s <= 0:
        parser.error("--requests must be >= 2, --max-tokens >= 1, --abandon-s > 0")
    if not set(args.protocols.split(",")) <= {"http", "grpc"}:
        parser.error(f"--protocols must name http and/or grpc, got {args.protocols!r}")
    summary = asyncio.run(run(args))
    print(json.dumps(summary), flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

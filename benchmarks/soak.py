"""Soak: thousands of mixed requests against a running shardserve app; nothing lost, nothing leaked.

    .venv/bin/shardserve serve configs/cpu-default.yaml &      # or any running app
    .venv/bin/python benchmarks/soak.py --url http://127.0.0.1:8000 --grpc 127.0.0.1:9000 --requests 10000

Traffic (request i gets kind i mod 10, with seeded randomness): HTTP chat, streamed chat, completions
with n = 2, streams the client closes after the first event, requests the client abandons after a
random 0.05-0.5 s, bad requests (out-of-range temperature, unknown model, empty messages,
out-of-vocabulary token ids), gRPC unary, gRPC streams cancelled after the first message and bad
gRPC requests. A good request that gets 429 / RESOURCE_EXHAUSTED waits Retry-After and tries again.
Counted as *lost*: a good request that does not end 200 / OK, a bad one that does not get its 4xx /
INVALID_ARGUMENT / NOT_FOUND, any 5xx, transport error or timeout. Afterwards the app's own
counters (GET <url>/v1/stats: each replica's engine stats) must show no request running or
waiting and no KV block held (`leaked`), and the replicas must be the ones that served at the start
(`restarts`). Memory: each replica's RSS after the first tenth of the requests and at the end.
The last line printed is a JSON summary; the exit code is 1 when anything was lost or leaked.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from typing import Any

import grpc
import httpx
from shardserve.cluster.proto import llm_pb2 as pb
from shardserve.cluster.proto import llm_pb2_grpc as rpc

GOOD, BAD, CANCEL = "good", "bad", "cancel"
MAX_RETRIES = 30
SETTLE_S = 90.0


async def replica_engines(http: httpx.AsyncClient, base: str, model: str) -> dict[str, dict[str, Any]]:
    """Each replica's engine stats as the app's router reports them (GET <base>/v1/stats)."""
    stats = (await http.get(base + "/v1/stats")).json()
    router = stats["models"][model]["router"] or {"replicas": {}}
    return {rid: r["engine"] for rid, r in router["replicas"].items()}


async def settle(http: httpx.AsyncClient, base: str, model: str) -> tuple[bool, dict[str, dict[str, Any]]]:
    """Wait until every replica reports nothing running, waiting or held (stats lag ~2 s), at most
    SETTLE_S: (idle, engine stats per replica). benchmarks/burst.py uses it too."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        await asyncio.sleep(2.5)
        engines = await replica_engines(http, base, model)
        idle = all(e.get("num_running") == 0 and e.get("num_waiting") == 0 and e.get("kv_cache_usage") == 0
                   for e in engines.values())  # fmt: skip
        if idle or time.monotonic() > deadline:
            return idle, engines


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.base = args.url.rstrip("/") + args.route_prefix
        self.outcomes: Counter[str] = Counter()
        self.lost: list[str] = []
        self.num_retries = 0

    # ---- one request of each kind ------------------------------------------------------------
    async def run_one(self, i: int, http: httpx.AsyncClient, stub: Any) -> None:
        rng = random.Random(self.args.seed * 1_000_003 + i)
        kind = i % 10
        model, max_tokens = self.args.model, rng.randint(1, self.args.max_tokens)
        chat = {"model": model, "messages": [{"role": "user", "content": f"Tell me about {rng.randint(0, 99)}."}],
                "max_tokens": max_tokens}  # fmt: skip
        try:
            if kind == 0:
                await self.http_good(http, "/v1/chat/completions", chat)
            elif kind == 1:
                await self.http_good(http, "/v1/chat/completions", {**chat, "stream": True})
            elif kind == 2:
                body = {"model": model, "prompt": "Once upon a time", "max_tokens": max_tokens, "n": 2,
                        "temperature": 0.8, "seed": i}  # fmt: skip
                await self.http_good(http, "/v1/completions", body)
            elif kind == 3:
                await self.http_close_early(http, {**chat, "stream": True, "max_tokens": self.args.max_tokens})
            elif kind == 4:
                await self.http_abandon(http, chat, rng.uniform(0.05, 0.5))
            elif kind == 5:
                bad = rng.choice([
                    ("/v1/chat/completions", {**chat, "temperature": -1}, 400),
                    ("/v1/chat/completions", {**chat, "model": "no-such-model"}, 404),
                    ("/v1/chat/completions", {**chat, "messages": []}, 400),
                    ("/v1/completions", {"model": model, "prompt": [1, 2, 10**9], "max_tokens": 2}, 400),
                ])  # fmt: skip
                await self.http_bad(http, *bad)
            elif kind in (6, 7):
                await self.grpc_good(stub, pb.GenerateRequest(
                    model=model, prompt=f"Count to {rng.randint(2, 9)}:", params=pb.SamplingParams(max_tokens=max_tokens)))
            elif kind == 8:
                await self.grpc_cancel(stub, pb.GenerateRequest(
                    model=model, prompt="Write a poem.", params=pb.SamplingParams(max_tokens=self.args.max_tokens)))
            else:
                await self.grpc_bad(stub, pb.GenerateRequest(model=model, prompt="x", params=pb.SamplingParams(top_p=0)))
        except Exception as err:  # transport errors, timeouts: lost
            self.lose(f"request {i} kind {kind}: {type(err).__name__}: {err}"[:300])

    def lose(self, what: str) -> None:
        self.outcomes["lost"] += 1
        self.lost.append(what)

    async def http_good(self, http: httpx.AsyncClient, path: str, body: dict[str, Any]) -> None:
        for _ in range(MAX_RETRIES):
            async with http.stream("POST", self.base + path, json=body) as resp:
                text = (await resp.aread()).decode()
            if resp.status_code == 429:
                self.num_retries += 1
                await asyncio.sleep(float(resp.headers.get("retry-after", "1")))
                continue
            if resp.status_code != 200 or (body.get("stream") and "data: [DONE]" not in text):
                return self.lose(f"good {path} -> {resp.status_code}: {text[:200]}")
            self.outcomes[GOOD] += 1
            return None
        return self.lose(f"good {path}: still 429 after {MAX_RETRIES} tries")

    async def http_close_early(self, http: httpx.AsyncClient, body: dict[str, Any]) -> None:
        async with http.stream("POST", self.base + "/v1/chat/completions", json=body) as resp:
            if resp.status_code not in (200, 429):
                return self.lose(f"stream -> {resp.status_code}")
            async for _ in resp.aiter_lines():
                break
        self.outcomes[CANCEL] += 1
        return None

    async def http_abandon(self, http: httpx.AsyncClient, body: dict[str, Any], after_s: float) -> None:
        try:
            resp = await asyncio.wait_for(http.post(self.base + "/v1/chat/completions", json=body), after_s)
        except asyncio.TimeoutError:
            self.outcomes[CANCEL] += 1
            return None
        if resp.status_code not in (200, 429):
            return self.lose(f"abandoned request answered {resp.status_code}: {resp.text[:200]}")
        self.outcomes[GOOD if resp.status_code == 200 else "429"] += 1
        return None

    async def http_bad(self, http: httpx.AsyncClient, path: str, body: dict[str, Any], status: int) -> None:
        resp = await http.post(self.base + path, json=body)
        error = resp.json().get("error") if resp.headers.get("content-type", "").startswith("application/json") else None
        if resp.status_code != status or not error or not error.get("message"):
            return self.lose(f"bad {path} -> {resp.status_code} (want {status}): {resp.text[:200]}")
        self.outcomes[BAD] += 1
        return None

    async def grpc_good(self, stub: Any, request: Any) -> None:
        for _ in range(MAX_RETRIES):
            try:
                reply = await stub.Generate(request, timeout=self.args.timeout)
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    self.num_retries += 1
                    await asyncio.sleep(1)
                    continue
                return self.lose(f"grpc good -> {err.code().name}: {err.details()}")
            if not reply.finish_reason:
                return self.lose("grpc good: no finish reason")
            self.outcomes[GOOD] += 1
            return None
        return self.lose(f"grpc good: still RESOURCE_EXHAUSTED after {MAX_RETRIES} tries")

    async def grpc_cancel(self, stub: Any, request: Any) -> None:
        call = stub.GenerateStream(request, timeout=self.args.timeout)
        try:
            async for _ in call:
                break
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                return self.lose(f"grpc stream -> {err.code().name}: {err.details()}")
        call.cancel()
        self.outcomes[CANCEL] += 1
        return None

    async def grpc_bad(self, stub: Any, request: Any) -> None:
        try:
            await stub.Generate(request, timeout=self.args.timeout)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_p" in (err.details() or ""):
                self.outcomes[BAD] += 1
                return None
            return self.lose(f"grpc bad -> {err.code().name}: {err.details()}")
        return self.lose("grpc bad request succeeded")

    async def run(self) -> dict[str, Any]:
        limits = httpx.Limits(max_connections=self.args.concurrency + 8)
        async with httpx.AsyncClient(limits=limits, timeout=self.args.timeout) as http, \
                grpc.aio.insecure_channel(self.args.grpc) as channel:  # fmt: skip
            stub = rpc.LLMServiceStub(channel)
            _, start_replicas = await settle(http, self.base, self.args.model)
            rss_warm: dict[str, int] = {}
            queue: asyncio.Queue[int] = asyncio.Queue()
            for i in range(self.args.requests):
                queue.put_nowait(i)
            warm_mark = max(1, self.args.requests // 10)
            start = time.monotonic()

            async def worker() -> None:
                while not queue.empty():
                    i = queue.get_nowait()
                    await self.run_one(i, http, stub)
                    if i == warm_mark:
                        for rid, engine in (await replica_engines(http, self.base, self.args.model)).items():
                            rss_warm[rid] = engine.get("process_rss_bytes", 0)

            await asyncio.gather(*(worker() for _ in range(self.args.concurrency)))
            elapsed = time.monotonic() - start
            _, end_replicas = await settle(http, self.base, self.args.model)
        leaked = {rid: e for rid, e in end_replicas.items()
                  if e.get("num_running") or e.get("num_waiting") or e.get("kv_cache_usage")}  # fmt: skip
        rss_growth = {rid: (e.get("process_rss_bytes", 0) - rss_warm[rid]) / max(1, rss_warm[rid])
                      for rid, e in end_replicas.items() if rss_warm.get(rid)}  # fmt: skip
        return {
            "requests": self.args.requests, "seconds": round(elapsed, 1), "outcomes": dict(self.outcomes),
            "lost": self.outcomes["lost"], "retries_after_429": self.num_retries, "leaked": len(leaked),
            "restarts": len(set(start_replicas) - set(end_replicas)), "rss_growth": rss_growth,
            "first_lost": self.lost[:5], "leaked_replicas": leaked,
        }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="HTTP base URL of the app")
    parser.add_argument("--route-prefix", default="", help="the app's Serve route prefix, e.g. /real")
    parser.add_argument("--grpc", default="127.0.0.1:9000", help="gRPC target host:port")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a good request may take")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.requests < 10 or args.concurrency < 1 or args.max_tokens < 1:
        parser.error("--requests must be >= 10, --concurrency and --max-tokens >= 1")
    summary = asyncio.run(Soak(args).run())
    print(json.dumps(summary), flush=True)
    return 1 if summary["lost"] or summary["leaked"] or summary["restarts"] else 0


if __name__ == "__main__":
    sys.exit(main())

"""Bursts and impatient clients against the real engine, through the served app (issue 20).

The real-engine app (tests/cluster/real_app.py: SmolLM2 on CPU, 8 running and 16 waiting samples
at most) gets BURST concurrent requests at once over HTTP, then over gRPC; half of the clients give
up after ABANDON_S (a timeout mid-request, or a stream closed after its first message). The
invariants: every answered request is 200 / OK or 429 / RESOURCE_EXHAUSTED (the 429s in OpenAI's
error shape with Retry-After) — never 5xx or UNAVAILABLE; the replica that served before the burst
still serves after it (no restart); the engine ends idle with no KV block held; and the next
request is answered at once. n counts against the queue: a request with n above the queue bound is
a 400 naming n.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import grpc
import httpx
import pytest
from real_app import MODEL, ROUTE_PREFIX, llm_stats
from shardserve.cluster.proto import llm_pb2 as pb
from shardserve.cluster.proto import llm_pb2_grpc as rpc

pytestmark = pytest.mark.slow
BURST = 300
ABANDON_S = 0.2
MAX_TOKENS = 16
SETTLE_S = 60


def wait_idle() -> dict:
    deadline = time.monotonic() + SETTLE_S
    while True:
        stats = llm_stats()
        if stats["num_running"] == 0 and stats["num_waiting"] == 0 and stats["kv_cache_usage"] == 0:
            return stats
        assert time.monotonic() < deadline, f"engine not idle {SETTLE_S}s after the burst: {stats}"
        time.sleep(0.2)


async def http_burst(base_url: str) -> Counter:
    url = base_url + ROUTE_PREFIX + "/v1/chat/completions"
    limits = httpx.Limits(max_connections=BURST + 8, max_keepalive_connections=BURST + 8)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:

        async def one(i: int) -> str:
            body = {"model": MODEL, "messages": [{"role": "user", "content": f"Say hello to number {i}."}],
                    "max_tokens": MAX_TOKENS, "stream": i % 4 == 1}  # fmt: skip
            if i % 2:  # an impatient client: gives up mid-request or after the first streamed event
                try:
                    async with asyncio.timeout(ABANDON_S):
                        async with client.stream("POST", url, json=body) as resp:
                            async for _ in resp.aiter_lines():
                                break
                            return f"abandoned {resp.status_code}"
                except TimeoutError:
                    return "abandoned"
            resp = await client.post(url, json=body)
            if resp.status_code == 429:
                error = resp.json()["error"]
                assert error["type"] == "rate_limit_error" and "queue" in error["message"], error
                assert int(resp.headers["retry-after"]) >= 1
            return str(resp.status_code)

        return Counter(await asyncio.gather(*(one(i) for i in range(BURST))))


async def grpc_burst(target: str) -> Counter:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = rpc.LLMServiceStub(channel)

        async def one(i: int) -> str:
            request = pb.GenerateRequest(model=MODEL, prompt=f"Count to {i}:",
                                         params=pb.SamplingParams(max_tokens=MAX_TOKENS))  # fmt: skip
            call = stub.GenerateStream(request)
            try:
                if i % 2:
                    try:
                        async with asyncio.timeout(ABANDON_S):
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

        return Counter(await asyncio.gather(*(one(i) for i in range(BURST))))


def check_outcomes(outcomes: Counter, ok: str, full: str) -> None:
    allowed = {ok, full} | {o for o in outcomes if o.startswith("abandoned")}
    assert set(outcomes) <= allowed, f"unexpected outcomes: {outcomes}"
    assert outcomes[ok] > 0 and outcomes[full] > 0, outcomes  # the queue was really full, and it served
    for outcome in outcomes:
        if outcome.startswith("abandoned "):  # a stream that answered before its client left
            assert outcome in ("abandoned 200", "abandoned 429"), outcomes


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_burst_with_abandoning_clients(real, protocol):
    before = llm_stats()["replica_id"]
    if protocol == "http":
        outcomes = asyncio.run(http_burst(real.http_url))
        check_outcomes(outcomes, "200", "429")
    else:
        outcomes = asyncio.run(grpc_burst(real.grpc_target))
        check_outcomes(outcomes, "OK", "RESOURCE_EXHAUSTED")
    stats = wait_idle()
    assert stats["replica_id"] == before, "the replica was restarted during the burst"
    start = time.monotonic()
    resp = httpx.post(real.http_url + ROUTE_PREFIX + "/v1/completions", timeout=60,
                      json={"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4})  # fmt: skip
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 4, resp.text
    assert time.monotonic() - start < 10, "the first request after the burst was not answered at once"
    assert llm_stats()["replica_id"] == before


def test_n_counts_against_the_queue(real):
    url = real.http_url + ROUTE_PREFIX + "/v1/completions"
    resp = httpx.post(url, json={"model": MODEL, "prompt": "Hi", "max_tokens": 2, "n": 17}, timeout=60)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == "n" and "max_queue_len = 16" in error["message"], error
    resp = httpx.post(url, json={"model": MODEL, "prompt": "Hi", "max_tokens": 2, "n": 16}, timeout=120)
    assert resp.status_code == 200 and len(resp.json()["choices"]) == 16, resp.text

"""bench serve's HTTP client against small real aiohttp servers that stream as other OpenAI-compatible
servers do: one token per event with a usage event last (vLLM), no usage event, an error event after
the headers, a 429. No Ray, no model: the client's parsing and timing are the subject here; the run
against our real app is tests/cluster/test_bench_serve.py."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web
from ports import free_port
from shardserve.cluster.bench_serve.clients import open_client
from shardserve.cluster.bench_serve.dataset import ServeRequest
from shardserve.cluster.bench_serve.settings import ClientSettings, Endpoint

REQUEST = ServeRequest(prompt=[1001, 1002, 1003], input_len=3, max_tokens=4)


def _event(data: dict) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()


def _choice(text: str, finish: str | None = None) -> dict:
    return {"choices": [{"index": 0, "text": text, "finish_reason": finish}]}


async def _serve(behaviour: str, bodies: list[dict], gap_s: float = 0.02):
    async def completions(request: web.Request) -> web.StreamResponse:
        bodies.append({**await request.json(), "_authorization": request.headers.get("Authorization")})
        if behaviour == "busy":
            return web.json_response({"error": {"message": "queue full", "type": "rate_limit"}}, status=429)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await asyncio.sleep(0.05)  # "prefill"
        for i, text in enumerate(["a", "", "b", "c", "d"]):  # an empty-text event (e.g. a partial character)
            if behaviour == "error" and i == 2:
                await resp.write(_event({"error": {"message": "engine died", "code": 500}}))
                return resp
            await resp.write(_event(_choice(text, "length" if i == 4 else None)))
            await asyncio.sleep(gap_s)
        if behaviour == "usage":
            await resp.write(_event({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 5}}))
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


async def _send(behaviour: str, api_key: str | None = None):
    bodies: list[dict] = []
    runner, port = await _serve(behaviour, bodies)
    try:
        endpoint = Endpoint("x", "http", f"http://127.0.0.1:{port}/v1/completions")
        async with open_client(endpoint, ClientSettings(model="m", api_key=api_key)) as client:
            return await client.send(7, REQUEST), bodies
    finally:
        await runner.cleanup()


def test_body_asks_for_exact_lengths_and_usage():
    _, (body,) = asyncio.run(_send("usage", api_key="sk-1"))
    assert body["_authorization"] == "Bearer sk-1"
    assert body["prompt"] == [1001, 1002, 1003] and body["max_tokens"] == 4 and body["model"] == "m"
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["min_tokens"] == 4 and body["temperature"] == 0.0


def test_vllm_like_stream_with_usage():
    record, _ = asyncio.run(_send("usage"))
    assert record.ok and record.index == 7 and record.finish_reason == "length"
    assert len(record.chunk_times_s) == 4  # the empty-text event carries no visible token
    assert (record.prompt_tokens, record.output_tokens) == (3, 5)  # the server's own count wins
    assert 0.04 < record.ttft_s < record.e2e_s and record.chunk_times_s == sorted(record.chunk_times_s)
    assert len(record.itl_s()) == 3 and all(x > 0 for x in record.itl_s())


def test_stream_without_usage_counts_events():
    record, _ = asyncio.run(_send("plain"))
    assert record.ok and record.output_tokens == 4 and record.prompt_tokens is None


@pytest.mark.parametrize(("behaviour", "message"), [("error", "error event: engine died"), ("busy", "HTTP 429")])
def test_errors_land_in_the_record(behaviour, message):
    record, _ = asyncio.run(_send(behaviour))
    assert not record.ok and message in record.error

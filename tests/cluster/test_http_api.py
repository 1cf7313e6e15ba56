"""The OpenAI HTTP API on a real local Ray cluster, called with the `openai` client and raw HTTP."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import time

import openai
import pytest
import requests
from doubles.fake_engine import FakeEngine

pytestmark = pytest.mark.slow


def client(cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster.http_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def fake_words(prompt: str, n: int) -> str:
    """The text FakeEngine produces for a prompt (same rule, computed locally)."""
    import asyncio

    from shardserve.workers.request import SamplingParams

    async def run() -> str:
        text = ""
        async for out in FakeEngine(token_delay_s=0).generate(prompt, SamplingParams(max_tokens=n), "x"):
            text = out.outputs[0].text
        return text

    return asyncio.run(run())


def test_completion_plain(cluster):
    resp = client(cluster).completions.create(model="fake", prompt="The capital of France is", max_tokens=5)
    assert resp.choices[0].text == fake_words("The capital of France is", 5)
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.prompt_tokens == len("The capital of France is")
    assert resp.usage.completion_tokens == 5


def test_completion_stream_with_usage(cluster):
    stream = client(cluster).completions.create(
        model="fake", prompt="Count:", max_tokens=6, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) == 6
    assert "".join(texts) == fake_words("Count:", 6)
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


def test_completion_stream_with_a_stream_interval(cluster):
    stream = client(cluster).completions.create(
        model="merged", prompt="Count:", max_tokens=30, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == fake_words("Count:", 30)
    assert 2 <= len(texts) < 30  # merged: fewer SSE events than tokens
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30


def test_chat_plain_and_stream(cluster):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rendered = "<|system|>Be brief.\n<|user|>Hi\n<|assistant|>"  # FakeEngine's chat template
    resp = client(cluster).chat.completions.create(model="solo", messages=messages, max_tokens=4)
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == fake_words(rendered, 4)
    assert resp.usage.prompt_tokens == len(rendered)

    stream = client(cluster).chat.completions.create(model="solo", messages=messages, max_tokens=4, stream=True)
    deltas = [c.choices[0].delta.content for c in stream if c.choices]
    assert "".join(deltas) == resp.choices[0].message.content


def test_stop_string_and_models(cluster):
    full = fake_words("stop test", 4)
    stop = full.split()[2]  # the third word
    resp = client(cluster).completions.create(model="solo", prompt="stop test", max_tokens=4, stop=[stop])
    assert resp.choices[0].finish_reason == "stop"
    assert resp.choices[0].text == full[: full.index(stop)]
    names = {m.id for m in client(cluster).models.list().data}
    assert names == {"fake", "solo", "tiny-queue", "fragile", "merged"}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"max_tokens": "many"}, "max_tokens"),
        ({"prompt": ""}, "prompt"),
    ],
)
def test_bad_params_get_400_naming_the_field(cluster, body, param):
    payload = {"model": "solo", "prompt": "hello", **body}
    r = requests.post(cluster.http_url + "/v1/completions", json=payload, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and param in error["message"]
    assert error["type"] == "invalid_request_error"


def test_openai_client_raises_typed_errors(cluster):
    with pytest.raises(openai.BadRequestError) as bad:
        client(cluster).completions.create(model="solo", prompt="x", max_tokens=0)
    assert "max_tokens must be in [1, 2147483647]" in str(bad.value)
    with pytest.raises(openai.NotFoundError) as missing:
        client(cluster).completions.create(model="no-such-model", prompt="x")
    assert missing.value.body["param"] == "model"


def test_bad_requests_do_not_disturb_good_ones(cluster):
    def good(i: int) -> str:
        return client(cluster).completions.create(model="fake", prompt=f"good {i}", max_tokens=8).choices[0].text

    def bad(i: int) -> int:
        payload = {"model": "fake", "prompt": "bad", "top_k": -5} if i % 2 else {"model": "nope", "prompt": "x"}
        return requests.post(cluster.http_url + "/v1/completions", json=payload, timeout=30).status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        goods = [pool.submit(good, i) for i in range(6)]
        bads = [pool.submit(bad, i) for i in range(6)]
        assert [f.result() for f in goods] == [fake_words(f"good {i}", 8) for i in range(6)]
        assert sorted(f.result() for f in bads) == [400, 400, 400, 404, 404, 404]


def test_queue_full_gets_429(cluster):
    url = cluster.http_url + "/v1/completions"
    long = {"model": "tiny-queue", "prompt": "busy", "max_tokens": 3000, "stream": True}
    session = requests.Session()  # keeps the streaming connections open while the test runs
    running = session.post(url, json=long, stream=True, timeout=60)  # takes the one slot
    lines = running.iter_lines()  # keep a reference: a collected line iterator closes the stream
    assert next(lines).startswith(b"data: ")
    pool = concurrent.futures.ThreadPoolExecutor(1)
    waiting = pool.submit(session.post, url, json=long, stream=True, timeout=60)  # fills the queue of 1
    try:
        deadline = time.time() + 20
        while cluster.llm_handle("tiny-queue").stats.remote().result()["num_waiting"] < 1:
            assert time.time() < deadline, "second request never queued"
            time.sleep(0.1)
        r = requests.post(url, json={"model": "tiny-queue", "prompt": "more", "max_tokens": 2}, timeout=30)
        assert r.status_code == 429, r.text
        assert r.json()["error"]["type"] == "rate_limit_error"
    finally:
        running.close()
        waiting.result().close()
        pool.shutdown()
        session.close()


def test_stream_disconnect_aborts_and_frees_blocks(cluster):
    payload = {"model": "solo", "prompt": "x" * 100, "max_tokens": cluster.long_max_tokens, "stream": True}
    r = requests.post(cluster.http_url + "/v1/completions", json=payload, stream=True, timeout=60)
    request_id = r.headers["x-shardserve-request-id"]
    lines = r.iter_lines()
    first = json.loads(next(line for line in lines if line).removeprefix(b"data: "))
    assert first["id"] == request_id
    assert cluster.debug_state()["held_blocks"][request_id] >= 7  # 100 prompt tokens / 16 per block
    r.close()  # the client goes away mid-stream
    state = cluster.wait_aborted(request_id)
    assert state["held_blocks"] == {} and state["num_free_blocks"] == state["num_blocks"]


def test_non_streaming_disconnect_aborts(cluster):
    """The client hangs up only once the engine runs its request, so the abort has a target."""
    body = json.dumps({"model": "solo", "prompt": "wait for me", "max_tokens": cluster.long_max_tokens}).encode()
    host, port = cluster.http_url.removeprefix("http://").split(":")
    before = set(cluster.debug_state()["held_blocks"])
    sock = socket.create_connection((host, int(port)), timeout=30)
    try:
        head = f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 60
        while not (running := set(cluster.debug_state()["held_blocks"]) - before):
            assert time.monotonic() < deadline, "the request never reached the engine"
            time.sleep(0.05)
    finally:
        sock.close()  # the client goes away before any byte of the response
    (request_id,) = running
    state = cluster.wait_aborted(request_id)
    assert state["num_free_blocks"] == state["num_blocks"]


def test_health_and_stats(cluster):
    r = requests.get(cluster.http_url + "/health", timeout=30)
    assert r.status_code == 200 and r.json()["models"] == {"fake": "ok", "solo": "ok", "tiny-queue": "ok", "fragile": "ok", "merged": "ok"}
    stats = requests.get(cluster.http_url + "/v1/stats", timeout=30).json()
    assert stats["models"]["solo"]["router"]["policy"] == "prefix_affinity"

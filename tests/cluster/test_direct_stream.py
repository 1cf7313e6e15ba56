"""The direct stream from the Ingress to an LLMServer replica (cluster/direct_stream.py, ingress/direct.py).

The wire on its own (a DirectServer and a DirectClient on one loop, no Ray): chunks in order with
connection reuse, a cancel that reaches the server's generator, a stopped port refused before any
chunk, a frame that is not a message refused. Then in the shared app (model `fake`, 2 replicas):
requests take the direct path (the router's per-replica count), and when a replica's actor is
killed every request still answers (the router's stale pick falls back to Serve's handle) until
Serve's replacement serves direct again.
"""

from __future__ import annotations

import asyncio
import pickle
import time
from collections.abc import AsyncIterator

import pytest
import requests
from shardserve.cluster.direct_stream import DirectClient, DirectServer, DirectStreamError, read_frame
from shardserve.cluster.messages import CompletionDelta, GenerateChunk, GenerateRequest
from shardserve.workers.request import SamplingParams


def _request(request_id: str, prompt: str = "hi") -> GenerateRequest:
    return GenerateRequest(request_id, "m", SamplingParams(max_tokens=3), prompt=prompt)


class _Generator:
    """A replica's `generate`: three chunks, or one that never ends for prompt "forever"."""

    def __init__(self) -> None:
        self.closed: list[str] = []

    async def __call__(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        try:
            for i in range(3):
                await asyncio.sleep(3600 if request.prompt == "forever" else 0)
                yield GenerateChunk(request.request_id, "r0", (CompletionDelta(0, str(i), 1),), finished=i == 2)
        finally:
            self.closed.append(request.request_id)


async def _texts(client: DirectClient, address: str, request: GenerateRequest) -> list[str]:
    call, texts = client.call(address, request), []
    while (chunk := await call.read()) is not None:
        texts.append(chunk.deltas[0].text)
    return texts


def test_wire_streams_reuses_cancels_and_refuses() -> None:
    async def main() -> None:
        generate = _Generator()
        server = DirectServer(generate)
        await server.start()
        client, address = DirectClient(), f"127.0.0.1:{server.port}"
        for i in range(3):  # one connection, reused once each call's end frame is read
            assert await _texts(client, address, _request(f"r{i}")) == ["0", "1", "2"]
            await asyncio.sleep(0.05)
            assert len(client._idle[address]) == 1
        call, done = client.call(address, _request("stuck", "forever")), []
        call.add_done_callback(done.append)
        reading = asyncio.ensure_future(call.read())
        await asyncio.sleep(0.1)
        call.cancel()
        assert done == [call]
        with pytest.raises(DirectStreamError) as err:
            await reading
        assert not err.value.started
        for _ in range(100):  # the server saw the connection close and closed the generator
            if "stuck" in generate.closed:
                break
            await asyncio.sleep(0.02)
        assert generate.closed == ["r0", "r1", "r2", "stuck"]
        # Not a message: the server closes the connection without unpickling anything else.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"\0\0\0\0")  # the auth frame (token auth is off here)
        data = pickle.dumps(print)
        writer.write(len(data).to_bytes(4, "little") + data)
        with pytest.raises(asyncio.IncompleteReadError):
            await read_frame(reader)
        writer.close()
        await server.stop(1.0)
        with pytest.raises(DirectStreamError) as err:  # the port is closed: the Ingress falls back
            await _texts(client, address, _request("late"))
        assert not err.value.started

    asyncio.run(main())


def _direct_counts(cluster) -> dict[str, int]:
    stats = requests.get(cluster.http_url + "/v1/stats", timeout=30).json()["models"]["fake"]["router"]
    return {rid: r["num_direct_streams"] for rid, r in stats["replicas"].items()}


def _complete(cluster, prompt: str) -> str:
    payload = {"model": "fake", "prompt": prompt, "max_tokens": 2}
    r = requests.post(cluster.http_url + "/v1/completions", json=payload, timeout=120)
    assert r.status_code == 200, r.text
    return r.headers["x-shardserve-replica"]


@pytest.mark.slow
def test_requests_go_direct_and_survive_a_killed_replica(cluster) -> None:
    import ray

    before = _direct_counts(cluster)
    served = {_complete(cluster, f"direct {i} " * 20) for i in range(6)}
    after = _direct_counts(cluster)
    assert sum(after.values()) >= sum(before.values()) + 6, (before, after)
    victim = sorted(served)[0]
    actor = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                 if "LLMServer_0_fake" in a["name"] and a["name"].endswith(victim))  # fmt: skip
    ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
    # Every request answers while the router may still pick the dead replica's address.
    replicas = {_complete(cluster, f"after the kill {i} " * 20) for i in range(8)}
    assert victim not in replicas
    deadline = time.monotonic() + 120
    while True:  # Serve's replacement publishes its own port and serves direct
        counts = _direct_counts(cluster)
        fresh = {rid: n for rid, n in counts.items() if rid not in before and rid != victim}
        if fresh and any(fresh.values()):
            break
        assert time.monotonic() < deadline, f"no direct stream to a replacement replica: {counts}"
        _complete(cluster, f"new prefix {time.monotonic()} " * 20)

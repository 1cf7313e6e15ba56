"""The direct stream from the Ingress to an LLMServer replica (cluster/direct_stream.py, ingress/direct.py).

The wire on its own (a DirectServer and a DirectClient on one loop, no Ray): chunks in order with
connection reuse, a cancel that reaches the server's generator, a stopped port refused before any
chunk, a frame that is not a message refused. Then in the shared app (model `fragile`, 1
replica, the cluster tests' breakable one): requests take the direct path (the router's count), and
when the replica's actor is killed every request still answers (the router's stale pick falls back
to Serve's handle, which waits for the replacement) until the replacement serves direct.
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

MODEL = "fragile"


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
    stats = requests.get(cluster.http_url + "/v1/stats", timeout=30).json()["models"][MODEL]["router"]
    return {rid: r["num_direct_streams"] for rid, r in stats["replicas"].items()}


def _complete(cluster, prompt: str) -> str:
    payload = {"model": MODEL, "prompt": prompt, "max_tokens": 2}
    r = requests.post(cluster.http_url + "/v1/completions", json=payload, timeout=120)
    assert r.status_code == 200, r.text
    return r.headers["x-shardserve-replica"]


@pytest.mark.slow
def test_requests_go_direct_and_survive_a_killed_replica(cluster) -> None:
    import ray

    before = _direct_counts(cluster)
    (victim,) = {_complete(cluster, f"direct {i}") for i in range(4)}
    after = _direct_counts(cluster)
    assert after[victim] >= before.get(victim, 0) + 4, (before, after)
    actor = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                 if f"LLMServer_3_{MODEL}" in a["name"] and a["name"].endswith(victim))  # fmt: skip
    ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
    # The router still knows the dead replica's address for a while: the requests that find it refused
    # go through Serve's handle, which waits for the replacement.
    replicas = {_complete(cluster, f"after the kill {i}") for i in range(4)}
    assert victim not in replicas
    deadline = time.monotonic() + 120
    while True:  # the replacement published its own address and takes direct streams
        counts = _direct_counts(cluster)
        if any(n for rid, n in counts.items() if rid != victim):
            break
        assert time.monotonic() < deadline, f"no direct stream to the replacement replica: {counts}"
        _complete(cluster, "once more")


def test_wire_over_ray_tls_refuses_plaintext_and_strangers(tmp_path, monkeypatch) -> None:
    """With RAY_USE_TLS both ends present Ray's node certificate and trust only Ray's CA."""
    from test_tls import _certificates

    certs = _certificates(tmp_path)
    monkeypatch.setenv("RAY_USE_TLS", "1")
    monkeypatch.setenv("RAY_TLS_CA_CERT", str(certs["ca_cert"]))

    def node_certificate(name: str) -> None:
        monkeypatch.setenv("RAY_TLS_SERVER_CERT", str(certs[f"{name}_cert"]))
        monkeypatch.setenv("RAY_TLS_SERVER_KEY", str(certs[f"{name}_key"]))

    async def main() -> None:
        node_certificate("server")
        server = DirectServer(_Generator())
        await server.start()
        address = f"127.0.0.1:{server.port}"
        assert await _texts(DirectClient(), address, _request("tls")) == ["0", "1", "2"]
        node_certificate("stranger")  # a certificate of another CA
        with pytest.raises(DirectStreamError) as err:
            await _texts(DirectClient(), address, _request("stranger"))
        assert not err.value.started
        monkeypatch.setenv("RAY_USE_TLS", "0")  # plaintext against the TLS port
        with pytest.raises(DirectStreamError) as err:
            await _texts(DirectClient(), address, _request("plain"))
        assert not err.value.started
        await server.stop(1.0)

    asyncio.run(main())

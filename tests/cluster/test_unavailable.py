"""A model whose engine died answers HTTP 503 / gRPC UNAVAILABLE, and the other models keep serving.

The `fragile` model's one FakeEngine is killed through the LLMServer test hook; requests that
were streaming end with an error event, new ones are refused with a message naming the dead
engine. Serve replaces the replica only after several failed health checks (~30 s), well after
these assertions. This module runs last among the cluster tests (its model stays dead a while).
"""

from __future__ import annotations

import json

import grpc
import pytest
import requests
from shardserve.cluster.proto import llm_pb2 as pb
from shardserve.cluster.proto import llm_pb2_grpc as rpc

pytestmark = pytest.mark.slow


def test_dead_engine_is_unavailable_while_others_serve(cluster):
    url = cluster.http_url + "/v1/completions"
    stream = requests.post(url, json={"model": "fragile", "prompt": "doomed", "max_tokens": 100_000, "stream": True},
                           stream=True, timeout=60)  # fmt: skip
    lines = stream.iter_lines()
    assert next(line for line in lines if line).startswith(b"data: ")
    cluster.llm_handle("fragile").kill_engine.remote().result(timeout_s=30)

    events = [json.loads(line.removeprefix(b"data: ")) for line in lines if line and line != b"data: [DONE]"]
    assert events[-1]["error"]["code"] == "unavailable" and "dead" in events[-1]["error"]["message"]

    r = requests.post(url, json={"model": "fragile", "prompt": "x", "max_tokens": 2}, timeout=30)
    assert r.status_code == 503, r.text
    assert r.json()["error"]["type"] == "service_unavailable_error" and "dead" in r.json()["error"]["message"]
    with grpc.insecure_channel(cluster.grpc_target) as channel:
        stub = rpc.LLMServiceStub(channel)
        req = pb.GenerateRequest(model="fragile", prompt="x", params=pb.SamplingParams(max_tokens=2))
        for call in (stub.Generate, lambda r: list(stub.GenerateStream(r))):
            with pytest.raises(grpc.RpcError) as err:
                call(req)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "dead" in err.value.details()
        other = stub.Generate(pb.GenerateRequest(model="solo", prompt="x", params=pb.SamplingParams(max_tokens=2)))
        assert other.num_tokens == 2
    ok = requests.post(url, json={"model": "fake", "prompt": "still here", "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200
    health = requests.get(cluster.http_url + "/health", timeout=30)
    assert health.status_code == 503 and health.json()["models"]["fragile"].startswith("dead")
    assert health.json()["models"]["solo"] == "ok"

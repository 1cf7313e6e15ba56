"""The gRPC API (shardserve.v1.LLMService) through Ray Serve's gRPC proxy, with generated stubs."""

from __future__ import annotations

import time

import grpc
import pytest
from shardserve.cluster.proto import llm_pb2 as pb
from shardserve.cluster.proto import llm_pb2_grpc as rpc

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stub(cluster):
    channel = grpc.insecure_channel(cluster.grpc_target)
    yield rpc.LLMServiceStub(channel)
    channel.close()


def request(model: str = "solo", prompt: str = "Hello gRPC", **params) -> pb.GenerateRequest:
    return pb.GenerateRequest(model=model, prompt=prompt, params=pb.SamplingParams(**params))


def test_unary_echoes_request_id(stub):
    resp, call = stub.Generate.with_call(request(max_tokens=5), metadata=[("x-request-id", "req-unary-1")])
    assert resp.request_id == "req-unary-1" and resp.num_tokens == 5 and resp.finish_reason == "length"
    assert len(resp.text.split()) == 5 and resp.usage.prompt_tokens == len("Hello gRPC")
    trailers = dict(call.trailing_metadata())
    assert trailers["x-request-id"] == "req-unary-1" and trailers["x-shardserve-replica"] == resp.replica_id


def test_stream_matches_unary(stub):
    unary = stub.Generate(request(prompt="same prompt", max_tokens=6))
    parts = list(stub.GenerateStream(request(prompt="same prompt", max_tokens=6)))
    assert "".join(p.text for p in parts) == unary.text
    assert [p.finish_reason for p in parts] == [""] * 5 + ["length"]
    assert parts[-1].usage.completion_tokens == 6


def test_chat_messages(stub):
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="Hi")])
    resp = stub.Generate(pb.GenerateRequest(model="solo", messages=chat, params=pb.SamplingParams(max_tokens=3)))
    assert resp.usage.prompt_tokens == len("<|user|>Hi\n<|assistant|>") and resp.num_tokens == 3


@pytest.mark.parametrize(
    ("req", "code", "field"),
    [
        (request(max_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        (request(temperature=-0.5), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        (request(top_p=2.0), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        (request(prompt=""), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        (request(model="no-such-model"), grpc.StatusCode.NOT_FOUND, "no-such-model"),
    ],
)
def test_error_status_codes(stub, req, code, field):
    for call in (stub.Generate, lambda r: list(stub.GenerateStream(r))):
        with pytest.raises(grpc.RpcError) as err:
            call(req)
        assert err.value.code() == code and field in err.value.details()


def test_queue_full_is_resource_exhausted(stub, cluster):
    busy = [stub.GenerateStream(request(model="tiny-queue", max_tokens=3000)) for _ in range(2)]
    try:
        next(busy[0])
        deadline = time.time() + 20
        while cluster.llm_handle("tiny-queue").stats.remote().result()["num_waiting"] < 1:
            assert time.time() < deadline, "second request never queued"
            time.sleep(0.1)
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(request(model="tiny-queue", max_tokens=2))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        for call in busy:
            call.cancel()


def wait_aborted(cluster, request_id: str) -> dict:
    deadline = time.time() + 20
    while True:
        state = cluster.debug_state()
        if request_id in state["aborted"] and request_id not in state["held_blocks"]:
            return state
        assert time.time() < deadline, f"{request_id} not aborted: {state}"
        time.sleep(0.1)


def test_cancel_mid_stream_aborts_and_frees_blocks(stub, cluster):
    call = stub.GenerateStream(request(prompt="y" * 64, max_tokens=3000), metadata=[("x-request-id", "grpc-cancel-1")])
    for _ in range(3):
        next(call)
    assert cluster.debug_state()["held_blocks"]["grpc-cancel-1"] >= 4
    call.cancel()
    state = wait_aborted(cluster, "grpc-cancel-1")
    assert state["num_free_blocks"] == state["num_blocks"]


def test_deadline_exceeded_aborts(stub, cluster):
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(request(max_tokens=3000), timeout=1.0, metadata=[("x-request-id", "grpc-deadline-1")])
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    state = wait_aborted(cluster, "grpc-deadline-1")
    assert state["num_free_blocks"] == state["num_blocks"]


def test_list_models_and_health(stub):
    names = [m.name for m in stub.ListModels(pb.ListModelsRequest()).models]
    assert names == ["fake", "solo", "tiny-queue"]
    health = stub.Health(pb.HealthRequest())
    assert health.ok and dict(health.models) == {"fake": "ok", "solo": "ok", "tiny-queue": "ok"}

"""The gRPC API (shardserve.v1.LLMService) on the Ingress's own gRPC server, with generated stubs."""

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


def test_stream_interval_merges_messages_and_keeps_every_token(stub):
    # The fake engine makes a token per 10 ms: at 50 ms per message a stream of 40 tokens comes
    # in far fewer messages, the end with the usage.
    unary = stub.Generate(request(model="solo", prompt="merge me", max_tokens=40))
    parts = list(stub.GenerateStream(request(model="merged", prompt="merge me", max_tokens=40)))
    assert "".join(p.text for p in parts) == unary.text
    assert 2 <= len(parts) <= 20, len(parts)
    assert [p.finish_reason for p in parts[:-1]] == [""] * (len(parts) - 1) and parts[-1].finish_reason == "length"
    assert parts[-1].usage.completion_tokens == 40


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
    # One request running (its first message proves it holds the engine's only slot), then one
    # queued: started in that order, so which of them runs never depends on arrival order.
    busy = [stub.GenerateStream(request(model="tiny-queue", max_tokens=3000))]
    try:
        next(busy[0])
        busy.append(stub.GenerateStream(request(model="tiny-queue", max_tokens=3000)))
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


def test_cancel_mid_stream_aborts_and_frees_blocks(stub, cluster):
    req = request(prompt="y" * 64, max_tokens=cluster.long_max_tokens)
    call = stub.GenerateStream(req, metadata=[("x-request-id", "grpc-cancel-1")])
    for _ in range(3):
        next(call)
    assert cluster.debug_state()["held_blocks"]["grpc-cancel-1"] >= 4
    call.cancel()
    state = cluster.wait_aborted("grpc-cancel-1")
    assert state["num_free_blocks"] == state["num_blocks"]


def test_deadline_exceeded_aborts(stub, cluster):
    """The deadline passes while the engine runs the request (the stream proves it started)."""
    req = request(max_tokens=cluster.long_max_tokens)
    call = stub.GenerateStream(req, timeout=3.0, metadata=[("x-request-id", "grpc-deadline-1")])
    with pytest.raises(grpc.RpcError) as err:
        for _ in call:
            pass
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    state = cluster.wait_aborted("grpc-deadline-1")
    assert state["num_free_blocks"] == state["num_blocks"]


def test_unary_deadline_exceeded_aborts(stub, cluster):
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(request(max_tokens=cluster.long_max_tokens), timeout=5.0,
                      metadata=[("x-request-id", "grpc-deadline-2")])  # fmt: skip
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    state = cluster.wait_aborted("grpc-deadline-2")
    assert state["num_free_blocks"] == state["num_blocks"]


def test_list_models_and_health(stub):
    names = [m.name for m in stub.ListModels(pb.ListModelsRequest()).models]
    assert names == ["fake", "solo", "tiny-queue", "fragile", "merged"]
    health = stub.Health(pb.HealthRequest())
    assert health.ok and dict(health.models) == {"fake": "ok", "solo": "ok", "tiny-queue": "ok", "fragile": "ok", "merged": "ok"}


def test_logprobs_and_n_unary_and_stream(stub):
    from shardserve.cluster.testing.fake_engine import decode_output_token, fake_logprobs

    resp = stub.Generate(request(prompt="grpc logprobs", max_tokens=4, n=2, seed=3, logprobs=2))
    assert [c.index for c in resp.completions] == [0, 1] and resp.completions[0].text != resp.completions[1].text
    assert resp.text == resp.completions[0].text and resp.usage.completion_tokens == 8
    for completion in resp.completions:
        assert "".join(p.sampled.token for p in completion.logprobs) == completion.text
        for position in completion.logprobs:
            entries = fake_logprobs(position.sampled.token_id, 2, decode_output_token)
            assert position.sampled.token == decode_output_token(position.sampled.token_id)
            assert position.sampled.logprob == entries[position.sampled.token_id].logprob
            top = sorted((lp for lp in entries.values() if lp.rank <= 2), key=lambda lp: lp.rank)
            assert [(t.token, t.logprob, t.rank) for t in position.top] == [(lp.decoded, lp.logprob, lp.rank) for lp in top]
    parts = list(stub.GenerateStream(request(prompt="grpc logprobs", max_tokens=4, n=2, seed=3, logprobs=2)))
    for completion in resp.completions:
        mine = [p for p in parts if p.index == completion.index]
        assert "".join(p.text for p in mine) == completion.text and mine[-1].finish_reason == "length"
        assert [lp for p in mine for lp in p.logprobs] == list(completion.logprobs)
    plain = stub.Generate(request(prompt="grpc logprobs", max_tokens=2))
    assert len(plain.logprobs) == 0 and len(plain.completions) == 1


@pytest.mark.parametrize(("params", "field"), [({"logprobs": 21}, "logprobs"), ({"n": 0}, "n")])
def test_sampling_range_errors_name_the_field(stub, params, field):
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(request(**params))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and f"params.{field}" in err.value.details()


def test_prompt_token_ids_reach_the_engine_as_is(stub):
    def by_ids(ids: list[int]) -> pb.GenerateRequest:
        return pb.GenerateRequest(model="solo", prompt_token_ids=pb.TokenIds(ids=ids),
                                  params=pb.SamplingParams(max_tokens=4))

    text = "ids in"
    ids = [ord(c) for c in text]  # what the fake engine's tokenizer makes of `text`
    unary = stub.Generate(by_ids(ids))
    assert unary.usage.prompt_tokens == len(ids) and unary.num_tokens == 4 and unary.finish_reason == "length"
    assert unary.text == stub.Generate(request(prompt=text, max_tokens=4)).text  # same tokens, same output
    parts = list(stub.GenerateStream(by_ids(ids)))
    assert "".join(p.text for p in parts) == unary.text and parts[-1].usage.prompt_tokens == len(ids)
    assert stub.Generate(by_ids([i + 1 for i in ids])).text != unary.text


@pytest.mark.parametrize(("ids", "field"), [([], "prompt_token_ids"), ([1, 10**9], "prompt")])
def test_bad_prompt_token_ids_are_invalid_argument(stub, ids, field):
    req = pb.GenerateRequest(model="solo", prompt_token_ids=pb.TokenIds(ids=ids), params=pb.SamplingParams(max_tokens=2))
    for call in (stub.Generate, lambda r: list(stub.GenerateStream(r))):
        with pytest.raises(grpc.RpcError) as err:
            call(req)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()

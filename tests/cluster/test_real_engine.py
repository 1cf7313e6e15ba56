"""End to end with the real AsyncEngine and the embedded SmolLM2-135M on CPU, as a second app.

The app `real` (tests/cluster/real_app.py, the session fixture `real` of conftest.py) runs next to
the fake-engine app in the same Serve instance: HTTP under the route prefix /real, gRPC on its own
free port (every Ingress runs its own gRPC server).
Logprobs and seeded n > 1 samples over HTTP are compared with the offline `LLM` API running the
same model section in this process.
"""

from __future__ import annotations

import time

import grpc
import pytest
from real_app import SECTION, http_client, llm_stats
from shardserve.cluster.proto import llm_pb2 as pb
from shardserve.cluster.proto import llm_pb2_grpc as rpc

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def offline():
    from shardserve.cluster.config import ModelSection
    from shardserve.workers.llm import LLM

    return LLM(config=ModelSection.model_validate(SECTION).to_engine_config())


def test_http_chat_and_stream(real):
    client = http_client(real)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    resp = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=6, temperature=0)
    text = resp.choices[0].message.content
    assert resp.usage.completion_tokens == 6 and text.strip()
    stream = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text


def test_grpc_unary_stream_and_cancel(real):
    with grpc.insecure_channel(real.grpc_target) as channel:
        stub = rpc.LLMServiceStub(channel)
        req = pb.GenerateRequest(model="smollm2", prompt="The capital of France is",
                                 params=pb.SamplingParams(max_tokens=4, temperature=0))  # fmt: skip
        unary = stub.Generate(req)
        assert unary.num_tokens == 4 and unary.finish_reason == "length"
        parts = list(stub.GenerateStream(req))
        assert "".join(p.text for p in parts) == unary.text
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(pb.GenerateRequest(model="smollm2", prompt="x", params=pb.SamplingParams(top_p=0)))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_p" in err.value.details()
        long = pb.GenerateRequest(model="smollm2", prompt="Tell me a long story.",
                                  params=pb.SamplingParams(max_tokens=400, ignore_eos=True))  # fmt: skip
        call = stub.GenerateStream(long)
        next(call)
        assert llm_stats(real)["num_running"] == 1
        call.cancel()
    deadline = time.time() + 30
    while (stats := llm_stats(real))["num_running"] or stats["kv_cache_usage"] > 0:
        assert time.time() < deadline, f"cancelled request still holds the engine: {stats}"
        time.sleep(0.2)


def test_http_logprobs_match_offline(real, offline):
    from shardserve.workers.request import SamplingParams

    prompt = "The capital of France is"
    resp = http_client(real).completions.create(model="smollm2", prompt=prompt, max_tokens=5, temperature=0, logprobs=3)
    (ref,) = offline.generate(prompt, SamplingParams(max_tokens=5, temperature=0, logprobs=3))
    ref_out = ref.outputs[0]
    lp = resp.choices[0].logprobs
    assert resp.choices[0].text == ref_out.text
    assert lp.tokens == [pos[t].decoded for t, pos in zip(ref_out.token_ids, ref_out.logprobs, strict=True)]
    assert lp.token_logprobs == pytest.approx(
        [pos[t].logprob for t, pos in zip(ref_out.token_ids, ref_out.logprobs, strict=True)], abs=1e-4
    )
    for top, pos in zip(lp.top_logprobs, ref_out.logprobs, strict=True):
        ranked = {e.decoded: e.logprob for e in pos.values() if e.rank <= 3}
        assert set(top) >= set(ranked) and all(top[k] == pytest.approx(v, abs=1e-4) for k, v in ranked.items())
    # Greedy: the sampled token is the most likely one.
    assert all(max(top.values()) == pytest.approx(t, abs=1e-6) for top, t in zip(lp.top_logprobs, lp.token_logprobs, strict=True))


def test_http_n2_with_seed_matches_offline(real, offline):
    from shardserve.workers.request import SamplingParams

    prompt = "Once upon a time"
    resp = http_client(real).completions.create(
        model="smollm2", prompt=prompt, max_tokens=8, temperature=0.9, n=2, seed=1234
    )
    (ref,) = offline.generate(prompt, SamplingParams(max_tokens=8, temperature=0.9, n=2, seed=1234))
    assert [c.index for c in resp.choices] == [0, 1]
    assert [c.text for c in resp.choices] == [o.text for o in ref.outputs]
    assert resp.choices[0].text != resp.choices[1].text
    assert resp.usage.completion_tokens == sum(len(o.token_ids) for o in ref.outputs)

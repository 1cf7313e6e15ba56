"""End-to-end engine features on the real SmolLM2: streaming, abort, n > 1, seeds, stops, logprobs."""

from __future__ import annotations

import asyncio
import math

import pytest
from shardserve.workers.async_engine import AsyncEngine
from shardserve.workers.config import EngineConfig, ModelConfig
from shardserve.workers.engine import LLMEngine
from shardserve.workers.request import FinishReason, SamplingParams

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(smollm2_loaded) -> LLMEngine:
    return LLMEngine(EngineConfig(model=ModelConfig(model="default", dtype="float32", device="cpu")), loaded=smollm2_loaded)


def _run(engine: LLMEngine, prompts: dict[str, str], params: SamplingParams):
    for request_id, prompt in prompts.items():
        engine.add_request(request_id, prompt, params)
    streamed: dict[str, list] = {k: [] for k in prompts}
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            streamed[out.request_id].append(out)
            if out.finished:
                finals[out.request_id] = out
    assert engine.kv_manager.num_free_blocks == engine.runner.num_blocks - 1
    return finals, streamed


def test_streamed_deltas_add_up_to_final_text(engine):
    finals, streamed = _run(engine, {"a": "Tell me a story about a dragon."}, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    final = finals["a"].outputs[0]
    assert "".join(o.outputs[0].new_text for o in streamed["a"]) == final.text
    assert sum(len(o.outputs[0].new_token_ids) for o in streamed["a"]) == len(final.token_ids) == 24
    assert final.text == engine.tokenizer.decode(list(final.token_ids), skip_special_tokens=True)
    metrics = finals["a"].metrics
    assert metrics.ttft is not None and metrics.ttft > 0 and len(metrics.inter_token_latencies) == 23


def test_final_only_requests_report_once_with_the_same_text(engine):
    stream = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=("dragon",))
    final_only = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, stop=("dragon",), final_only=True)
    prompt = "Tell me a story about a"
    engine.add_request("s", prompt, stream)
    engine.add_request("f", prompt, final_only)
    seen: dict[str, list] = {"s": [], "f": []}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append(out)
    assert len(seen["s"]) > 1 and len(seen["f"]) == 1 and seen["f"][0].finished
    got, want = seen["f"][0].outputs[0], seen["s"][-1].outputs[0]
    assert (got.text, got.token_ids, got.finish_reason) == (want.text, want.token_ids, want.finish_reason)
    assert got.new_text == got.text and got.new_token_ids == got.token_ids  # the delta is everything


def test_seeded_sampling_is_reproducible_whatever_the_batch(engine):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=12, ignore_eos=True)
    alone, _ = _run(engine, {"x": "The weather today"}, params)
    batched, _ = _run(engine, {"y": "Other prompt here", "x": "The weather today", "z": "Third"}, params)
    assert alone["x"].outputs[0].token_ids == batched["x"].outputs[0].token_ids
    other, _ = _run(engine, {"x": "The weather today"}, SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=12, ignore_eos=True))
    assert other["x"].outputs[0].token_ids != alone["x"].outputs[0].token_ids


def test_n_samples_share_prompt_blocks(engine):
    prompt = "Write one sentence about the ocean, the sky and the mountains of a faraway country:" * 2
    hits_before = engine.kv_manager.prefix_cache_stats
    finals, _ = _run(engine, {"n": prompt}, SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True))
    outs = finals["n"].outputs
    assert [o.index for o in outs] == [0, 1, 2]
    assert all(len(o.token_ids) == 8 for o in outs)
    assert len({o.token_ids for o in outs}) > 1  # distinct seeds per sample
    hits_after = engine.kv_manager.prefix_cache_stats
    num_prompt = len(engine.tokenize(prompt))
    # Samples 1 and 2 found every full block of the prompt in the cache.
    full_blocks_tokens = (num_prompt - 1) // engine.config.cache.block_size * engine.config.cache.block_size
    assert hits_after.num_hit_tokens - hits_before.num_hit_tokens >= 2 * full_blocks_tokens


def test_stop_string_and_stop_token(engine):
    greedy, _ = _run(engine, {"s": "Count: 1, 2, 3, 4,"}, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    text = greedy["s"].outputs[0].text
    stop = text[3:6]  # a stop string that appears in the greedy continuation
    stopped, streamed = _run(engine, {"s": "Count: 1, 2, 3, 4,"}, SamplingParams(temperature=0, max_tokens=16, stop=[stop], ignore_eos=True))
    out = stopped["s"].outputs[0]
    assert out.finish_reason == FinishReason.STOP and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]
    assert "".join(o.outputs[0].new_text for o in streamed["s"]) == out.text
    first_token = greedy["s"].outputs[0].token_ids[2]
    by_id, _ = _run(engine, {"t": "Count: 1, 2, 3, 4,"}, SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[first_token], ignore_eos=True))
    assert by_id["t"].outputs[0].stop_reason == first_token
    assert by_id["t"].outputs[0].token_ids == greedy["s"].outputs[0].token_ids[:3]


def test_logprobs_and_prompt_logprobs(engine):
    finals, _ = _run(engine, {"l": "The capital of France is"}, SamplingParams(temperature=0, max_tokens=4, logprobs=3, prompt_logprobs=2, ignore_eos=True))
    out = finals["l"]
    completion = out.outputs[0]
    assert len(completion.logprobs) == 4
    for token_id, position in zip(completion.token_ids, completion.logprobs, strict=True):
        assert position[token_id].rank == 1  # greedy picks the top token
        assert 3 <= len(position) <= 4
        assert all(lp.logprob <= 0 and math.isfinite(lp.logprob) for lp in position.values())
    assert len(out.prompt_logprobs) == len(out.prompt_token_ids)
    assert out.prompt_logprobs[0] is None
    for token_id, position in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:], strict=True):
        assert token_id in position


def test_async_abort_frees_blocks(smollm2_loaded):
    engine = AsyncEngine(LLMEngine(EngineConfig(model=ModelConfig(model="default", dtype="float32", device="cpu")), loaded=smollm2_loaded))

    async def main():
        received = 0
        async for out in engine.generate("Tell me everything about the history of Rome.", SamplingParams(max_tokens=500, ignore_eos=True), "long"):
            received += len(out.outputs[0].new_token_ids)
            if received >= 3:
                break  # the consumer goes away: the generator's finally aborts
        for _ in range(100):
            stats = await engine.stats()
            if stats.num_running == 0 and stats.kv_cache_usage == 0:
                break
            await asyncio.sleep(0.02)
        assert stats.num_running == 0 and stats.kv_cache_usage == 0.0
        # The engine still serves.
        final = None
        async for out in engine.generate("Hi", SamplingParams(max_tokens=2, ignore_eos=True), "after"):
            final = out
        assert final.finished and final.outputs[0].finish_reason == FinishReason.LENGTH

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()


def test_prompt_logprobs_survive_preemption_mid_prompt(engine, smollm2_loaded):
    from shardserve.workers.config import CacheConfig, SchedulerConfig

    prompt = ("Once upon a time, in a kingdom far away, there lived a princess who loved to read books "
              "about dragons, castles and faraway lands.")
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=3, ignore_eos=True)
    want = _run(engine, {"p": prompt}, params)[0]["p"]  # default engine: one prefill, no preemption
    # 4-token blocks, a 4-token step budget and 15 usable blocks: "p" (last admitted, so the FCFS
    # victim) is prefilled in chunks beside two growing decodes that keep taking its blocks away.
    # With max_tokens=1 it finishes on its last prompt chunk, so every preemption is mid-prompt.
    small = LLMEngine(
        EngineConfig(model=ModelConfig(model="default", dtype="float32", device="cpu"),
                     cache=CacheConfig(block_size=4, num_blocks=16),
                     scheduler=SchedulerConfig(max_num_batched_tokens=4)),
        loaded=smollm2_loaded,
    )
    decode = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    small.add_request("a", "List three prime numbers greater than ten and explain why.", decode)
    small.add_request("b", "Translate to French: The weather is nice today.", decode)
    small.add_request("p", prompt, params)
    finals = {}
    while small.has_unfinished_requests():
        for out in small.step():
            if out.finished:
                finals[out.request_id] = out
    got = finals["p"]
    assert got.metrics.num_preemptions > 0
    assert len(want.prompt_token_ids) > 4 * 4  # several chunks
    assert got.prompt_token_ids == want.prompt_token_ids
    assert len(want.prompt_logprobs) == len(want.prompt_token_ids)
    assert len(got.prompt_logprobs) == len(got.prompt_token_ids)
    assert got.prompt_logprobs[0] is None and want.prompt_logprobs[0] is None
    for position in range(1, len(want.prompt_token_ids)):
        g, w = got.prompt_logprobs[position], want.prompt_logprobs[position]
        assert want.prompt_token_ids[position] in g, position
        assert g.keys() == w.keys(), position
        for token_id in w:
            assert abs(g[token_id].logprob - w[token_id].logprob) < 1e-4, (position, token_id)
            assert g[token_id].rank == w[token_id].rank, (position, token_id)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_kv_cache_full_finish_reports_each_token_once(smollm2_loaded, async_scheduling):
    # 4-token blocks, 6 in the pool (5 usable = 20 tokens): each request outgrows the pool alone
    # and the scheduler finishes it (kv_cache_full) without a new token. That finish must not feed
    # the last token through the text stream again (its text came out twice), and a request
    # finished before its first token is on the host must not crash the step.
    from shardserve.workers.config import CacheConfig, SchedulerConfig

    small = LLMEngine(
        EngineConfig(model=ModelConfig(model="default", dtype="float32", device="cpu"),
                     cache=CacheConfig(block_size=4, num_blocks=6),
                     scheduler=SchedulerConfig(async_scheduling=async_scheduling)),
        loaded=smollm2_loaded,
    )
    tokenizer = small.tokenizer
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    for prompt_len in (6, 18, 19):  # 19: the longest prompt the pool admits
        request_id = f"r{prompt_len}"
        small.add_request(request_id, list(range(1000, 1000 + prompt_len)), params)
        streamed, final = [], None
        while small.has_unfinished_requests():
            for out in small.step():
                streamed.append(out.outputs[0].new_text)
                final = out if out.finished else final
        completion = final.outputs[0]
        assert completion.finish_reason is FinishReason.LENGTH and completion.stop_reason == "kv_cache_full"
        assert 1 <= len(completion.token_ids) <= 21 - prompt_len
        assert completion.text == tokenizer.decode(completion.token_ids)
        assert "".join(streamed) == completion.text

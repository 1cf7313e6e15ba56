"""Async scheduling (SchedulerConfig.async_scheduling): batch N+1 is scheduled and launched
before batch N's tokens reach the host, and the outputs must equal the synchronous engine's.

The real SmolLM2 (greedy, float32 CPU) runs one batch mixing what can end a request — EOS,
max_tokens, stop token ids, stop strings — with n > 1 seeded sampling and logprobs, under the
default budget, chunked prefill (16-token steps) and a KV pool small enough to force preemption.
Separately: an abort mid-run, penalties (those steps run synchronously), the scheduler's
placeholders, the `LLM` option and config validation. Each runs at the default depth (2 batches
in flight) and at SchedulerConfig.async_depth 3 (the driver a step further ahead: a request
sits in up to 3 batches, and one that ends early has up to 2 results dropped). Every run ends
with no KV block held, and the engine stat `max_batches_in_flight == depth` shows batches
really overlapped.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from shardserve.workers.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from shardserve.workers.engine import LLMEngine
from shardserve.workers.kv_cache.manager import KVCacheManager
from shardserve.workers.llm import LLM
from shardserve.workers.request import FinishReason, Request, SamplingParams
from shardserve.workers.scheduler.in_flight import PLACEHOLDER
from shardserve.workers.scheduler.scheduler import Scheduler
from shardserve.workers.step_types import ModelRunnerOutput

pytestmark = pytest.mark.slow

CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
PROMPTS = {
    "eos": CHAT.format("What is 2+2? Answer with a number only."),  # ends with EOS after a few tokens
    "eos_short": "Answer with one word. What color is the sky?",  # EOS at once
    "long": "Tell me a story about a dragon who lived in the mountains of a faraway country.",
    "len1": "The capital of France is",
    "stop_str": "Count: 1, 2, 3, 4,",
    "stop_id": CHAT.format("Say hi."),
    "n3": "Write one sentence about the ocean:",
    "logprobs": "The weather today",
}


def _config(async_scheduling: bool, **overrides: object) -> EngineConfig:
    scheduler = {k: v for k, v in overrides.items() if k in SchedulerConfig.__dataclass_fields__}
    cache = {k: v for k, v in overrides.items() if k in CacheConfig.__dataclass_fields__}
    return EngineConfig(
        model=ModelConfig(model="default", dtype="float32", device="cpu"),
        cache=CacheConfig(**{"num_blocks": 512, **cache}),
        scheduler=SchedulerConfig(async_scheduling=async_scheduling, **scheduler),
    )


def _params() -> dict[str, SamplingParams]:
    greedy = SamplingParams(temperature=0, max_tokens=24)
    return {
        "eos": greedy,
        "eos_short": greedy,
        "long": replace(greedy, max_tokens=30, ignore_eos=True),
        "len1": replace(greedy, max_tokens=1),
        "stop_str": replace(greedy, stop=(" 7",), ignore_eos=True),
        "stop_id": replace(greedy, stop_token_ids=(30,)),  # "." in SmolLM2's vocabulary
        "n3": SamplingParams(n=3, temperature=0.8, top_p=0.9, seed=7, max_tokens=10, ignore_eos=True),
        "logprobs": replace(greedy, max_tokens=6, logprobs=3, prompt_logprobs=2),
    }


def _run(engine: LLMEngine, params: dict[str, SamplingParams], abort: tuple[str, int] | None = None):
    """Run every prompt to the end; `abort` = (request id, step after which it is aborted).
    Returns request id -> per output (token ids, text, finish reason, stop reason, logprobs)."""
    for request_id, p in params.items():
        engine.add_request(request_id, PROMPTS[request_id], p)
    finals = {}
    step = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
        step += 1
        if abort is not None and step == abort[1]:
            engine.abort_request(abort[0])
    assert engine.kv_manager.num_free_blocks == engine.runner.num_blocks - 1  # no block leaked
    assert not engine.scheduler.in_flight and not engine.scheduler.in_flight._free_on_return
    return {
        request_id: [
            (o.token_ids, o.text, o.finish_reason, o.stop_reason,
             None if o.logprobs is None else [{t: lp.logprob for t, lp in pos.items()} for pos in o.logprobs])
            for o in out.outputs
        ]
        for request_id, out in finals.items()
    }


DEPTHS = (2, 3)  # SchedulerConfig.async_depth: the default, and the driver one more step ahead


def _assert_same(got: dict, want: dict) -> None:
    """Same requests, token ids, text and finish / stop reasons; logprobs of the same tokens
    within 1e-4 (batches of other shapes round fp32 matmuls differently, which rounding to
    4 decimals does not hide at a boundary: -2.58655 vs -2.58665 was seen at depth 3)."""
    assert got.keys() == want.keys()
    for request_id in want:
        assert len(got[request_id]) == len(want[request_id]), request_id
        for (*fields, logprobs), (*want_fields, want_logprobs) in zip(got[request_id], want[request_id], strict=True):
            assert fields == want_fields, request_id
            assert (logprobs is None) == (want_logprobs is None), request_id
            for pos, want_pos in zip(logprobs or [], want_logprobs or [], strict=True):
                assert pos.keys() == want_pos.keys(), request_id
                assert all(abs(pos[t] - want_pos[t]) <= 1e-4 for t in pos), (request_id, pos, want_pos)


@pytest.fixture(scope="module")
def engines(smollm2_loaded):
    """(sync engine, {async depth: async engine}) by variant name, built once."""
    variants = {
        "default": {},
        "chunked": {"max_num_batched_tokens": 16},
        "preempt": {"max_num_batched_tokens": 32, "block_size": 4, "num_blocks": 24},
    }
    return {name: (LLMEngine(_config(False, **kw), loaded=smollm2_loaded),
                   {depth: LLMEngine(_config(True, async_depth=depth, **kw), loaded=smollm2_loaded)
                    for depth in DEPTHS})
            for name, kw in variants.items()}


def _pair(engines, variant: str, depth: int) -> tuple[LLMEngine, LLMEngine]:
    sync_engine, by_depth = engines[variant]
    return sync_engine, by_depth[depth]


@pytest.fixture(scope="module")
def sync_run(engines):
    """`_run` on a variant's synchronous engine, each (variant, case, abort) run once per module:
    the reference that both depths' tests compare with (the same engine, prompts and params, and
    greedy or seeded, so a second run would repeat the first)."""
    done: dict[tuple, dict] = {}

    def run(variant: str, case: str, params: dict[str, SamplingParams], abort: tuple[str, int] | None = None):
        key = (variant, case, abort)
        if key not in done:
            done[key] = _run(engines[variant][0], params, abort=abort)
        return done[key]

    return run


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("variant", ["default", "chunked", "preempt"])
def test_async_outputs_equal_sync(engines, sync_run, variant, depth):
    sync_engine, async_engine = _pair(engines, variant, depth)
    want = sync_run(variant, "all", _params())
    got = _run(async_engine, _params())
    _assert_same(got, want)
    reasons = {rid: outs[0][2:4] for rid, outs in want.items()}
    # The batch really exercises each way a request ends.
    assert reasons["eos"] == (FinishReason.STOP, None) and reasons["eos_short"] == (FinishReason.STOP, None)
    assert reasons["long"][0] == reasons["len1"][0] == FinishReason.LENGTH
    assert reasons["stop_str"] == (FinishReason.STOP, " 7") and reasons["stop_id"] == (FinishReason.STOP, 30)
    assert async_engine.stats().max_batches_in_flight == depth  # steps overlapped
    assert sync_engine.stats().max_batches_in_flight == 1  # depth 1: one batch, collected in its step
    if variant == "preempt":
        assert sync_engine.stats().num_preemptions > 0
        # At depth 3 every running request sits in the batches in flight whenever schedule()
        # runs, and those are never preemption victims: a request short of blocks waits for
        # one to finish instead (same outputs, checked above).
        assert async_engine.stats().num_preemptions > 0 or depth > 2


@pytest.mark.parametrize("depth", DEPTHS)
def test_abort_mid_run(engines, sync_run, depth):
    """An abort while the request is in the batches in flight: its outputs stop (a prefix of the
    full run's: a request admitted late may have fewer tokens than in the synchronous engine,
    whose batch N+1 already saw batch N's results), the others are unaffected."""
    _, async_engine = _pair(engines, "default", depth)
    params = {k: v for k, v in _params().items() if k in ("long", "stop_str", "n3", "eos")}
    full = sync_run("default", "abort", params)
    for victim, step in (("long", 4), ("n3", 3), ("n3", 1)):
        abort = (victim, step)
        for got in (sync_run("default", "abort", params, abort), _run(async_engine, params, abort=abort)):
            _assert_same({k: v for k, v in got.items() if k != victim}, {k: v for k, v in full.items() if k != victim})
            for (ids, _, reason, _, _), (full_ids, *_) in zip(got[victim], full[victim], strict=True):
                assert reason == FinishReason.ABORT and ids == full_ids[: len(ids)] and len(ids) < len(full_ids)


@pytest.mark.parametrize("depth", DEPTHS)
def test_penalties_run_synchronously_and_match(engines, sync_run, depth):
    _, async_engine = _pair(engines, "default", depth)
    params = {
        "long": SamplingParams(temperature=0, max_tokens=20, repetition_penalty=1.3, ignore_eos=True),
        "stop_str": SamplingParams(temperature=0, max_tokens=20, presence_penalty=0.5, frequency_penalty=0.5,
                                   ignore_eos=True),
        "n3": _params()["n3"],
        "eos": _params()["eos"],
    }
    want = sync_run("default", "penalties", params)
    got = _run(async_engine, params)
    _assert_same(got, want)


@pytest.mark.parametrize("depth", DEPTHS)
def test_seeded_sampling_equal(engines, sync_run, depth):
    _, async_engine = _pair(engines, "chunked", depth)
    seeded = SamplingParams(temperature=1.0, top_k=50, seed=1234, max_tokens=16)
    params = {k: replace(seeded, seed=1234 + i) for i, k in enumerate(("long", "eos", "stop_id", "logprobs"))}
    params["n3"] = replace(seeded, n=2, min_tokens=4)
    _assert_same(_run(async_engine, params), sync_run("chunked", "seeded", params))


def test_scheduler_feeds_placeholders_and_foresees_the_end():
    kv = KVCacheManager(64, 4)
    scheduler = Scheduler(SchedulerConfig(async_scheduling=True), CacheConfig(block_size=4), kv, 64,
                          max_batches_in_flight=2, async_scheduling=True)
    scheduler.add_request(Request("a", [1, 2, 3], SamplingParams(max_tokens=5, ignore_eos=True)))
    scheduler.add_request(Request("b", [4, 5], SamplingParams(max_tokens=1, ignore_eos=True)))
    first = scheduler.schedule()
    second = scheduler.schedule()  # before the first batch's tokens are known
    assert [(r.request_id, r.token_ids) for r in first.scheduled] == [("a", (1, 2, 3)), ("b", (4, 5))]
    # "b" ends with its first token (max_tokens=1): not scheduled again; "a" decodes a placeholder.
    assert [(r.request_id, r.token_ids, r.start_position, r.sample) for r in second.scheduled] == \
        [("a", (PLACEHOLDER,), 3, True)]
    assert scheduler.update_from_output(first, ModelRunnerOutput({"a": 7, "b": 8}))[0].output_token_ids == [7]
    third = scheduler.schedule()
    assert [(r.request_id, r.token_ids, r.start_position) for r in third.scheduled] == [("a", (PLACEHOLDER,), 4)]
    scheduler.update_from_output(second, ModelRunnerOutput({"a": 9}))
    scheduler.finish_request("a", FinishReason.ABORT)  # while "third" is in flight: blocks kept
    assert kv.num_free_blocks < 63
    scheduler.update_from_output(third, ModelRunnerOutput({"a": 10}))
    assert kv.num_free_blocks == 63 and not scheduler.has_unfinished()


def test_depth_three_schedules_two_placeholders_ahead():
    kv = KVCacheManager(64, 4)
    scheduler = Scheduler(SchedulerConfig(async_scheduling=True, async_depth=3), CacheConfig(block_size=4), kv, 64,
                          max_batches_in_flight=3, async_scheduling=True)
    scheduler.add_request(Request("a", [1, 2, 3], SamplingParams(max_tokens=5, ignore_eos=True)))
    scheduler.add_request(Request("b", [4, 5], SamplingParams(max_tokens=2, ignore_eos=True)))
    batches = [scheduler.schedule() for _ in range(3)]  # none of their tokens known yet
    rows = [[(r.request_id, r.token_ids, r.start_position) for r in b.scheduled] for b in batches]
    assert rows[0] == [("a", (1, 2, 3), 0), ("b", (4, 5), 0)]
    assert rows[1] == [("a", (PLACEHOLDER,), 3), ("b", (PLACEHOLDER,), 2)]
    assert rows[2] == [("a", (PLACEHOLDER,), 4)]  # "b"'s two tokens are in flight: its max_tokens
    assert scheduler.in_flight.num_batches("a") == 3 and scheduler.in_flight.num_batches("b") == 2
    scheduler.update_from_output(batches[0], ModelRunnerOutput({"a": 7, "b": 8}))
    scheduler.update_from_output(batches[1], ModelRunnerOutput({"a": 9, "b": 10}))
    assert scheduler.in_flight.num_batches("b") == 0 and "b" not in scheduler.requests  # finished: max_tokens
    scheduler.finish_request("a", FinishReason.ABORT)  # while batches[2] holds it: blocks kept
    assert scheduler.in_flight.num_batches("a") == 1 and kv.num_free_blocks < 63
    scheduler.update_from_output(batches[2], ModelRunnerOutput({"a": 11}))
    assert kv.num_free_blocks == 63 and not scheduler.has_unfinished()


def test_llm_option_and_validation():
    prompts = [[5, 6, 7, 8], [9, 10], list(range(20, 45))]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    sync = LLM("dummy:tiny-llama", device="cpu", dtype="float32", num_blocks=64).generate(prompts, params)
    llm = LLM("dummy:tiny-llama", device="cpu", dtype="float32", num_blocks=64, async_scheduling=True)
    assert llm.engine.async_scheduling
    got = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in sync]
    with pytest.raises(ValueError, match="async_scheduling requires pipeline_parallel_size == 1"):
        EngineConfig(scheduler=SchedulerConfig(async_scheduling=True), parallel=ParallelConfig(pipeline_parallel_size=2))
    with pytest.raises(ValueError, match="async_scheduling must be true, false or null"):
        SchedulerConfig(async_scheduling=1)  # type: ignore[arg-type]
    for depth in (1, 5, 2.0, True):
        with pytest.raises(ValueError, match=r"async_depth must be an integer in \[2, 4\]"):
            SchedulerConfig(async_depth=depth)  # type: ignore[arg-type]
    deep = LLM("dummy:tiny-llama", device="cpu", dtype="float32", num_blocks=64, async_depth=3)
    assert deep.engine.max_batches_in_flight == 3
    assert [o.outputs[0].token_ids for o in deep.generate(prompts, params)] == [o.outputs[0].token_ids for o in sync]
    # Default (None): on with one pipeline stage, off under pipeline parallelism.
    assert EngineConfig().use_async_scheduling
    assert not EngineConfig(parallel=ParallelConfig(pipeline_parallel_size=2)).use_async_scheduling
    assert not EngineConfig(scheduler=SchedulerConfig(async_scheduling=False)).use_async_scheduling

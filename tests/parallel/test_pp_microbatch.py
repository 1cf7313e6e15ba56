"""Pipeline micro-batching: with PP = P the engine keeps up to P batches in flight, or
ParallelConfig.pipeline_micro_batches = D in [P, 2P] (D = P + 1 hides the driver's turnaround).

Every run must give the single-process engine's greedy tokens and logprobs: varied prompt
lengths with prompts longer than a chunk (chunked prefill across batches), a KV pool small
enough to force preemption by recompute, PP 2 alone and TP 2 x PP 2 (4 gloo ranks), and PP 2
with 3 and 4 micro-batches (more batches in flight than stages: a rank must not reuse a buffer
an in-flight batch still needs). The engine's `max_batches_in_flight` stat shows the queue
actually held D batches. Aborting a request while its batch is in flight leaks no KV block and
leaves the other requests intact, at D = 2 and 3. pipeline_micro_batches outside its range is
refused with a ValueError naming the field and the range.
Runs that preempt compare sampled tokens and logprobs only: a request preempted in the middle
of its prompt reports some prompt logprobs twice (OutputProcessor appends the recomputed
chunks again), in one process as well, and where that happens depends on the batch timing.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from parallel_helpers import (
    assert_same_outputs,
    engine_config,
    generate,
    make_prompts,
    run_engine,
    single_process,
    write_checkpoint,
)
from shardserve.workers.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from shardserve.workers.engine import LLMEngine
from shardserve.workers.request import FinishReason, SamplingParams

# Prompts of 37 and 29 tokens exceed the 16-token budget: they are prefilled in chunks.
LENGTHS = (5, 37, 11, 3, 29, 8, 17, 2)


def microbatch_config(folder, tp: int = 1, pp: int = 2, num_blocks: int = 64, **parallel: object) -> EngineConfig:
    config = engine_config(folder, tp=tp, pp=pp, **parallel)
    return replace(config, scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=16),
                   cache=CacheConfig(block_size=4, num_blocks=num_blocks))


def run_and_stats(config: EngineConfig, prompts: dict[str, list[int]], max_tokens: int = 8):
    engine = LLMEngine(config)
    try:
        return run_engine(engine, prompts, max_tokens), engine.stats()
    finally:
        engine.shutdown()


def test_pp2_microbatches_equal_single_process(tmp_path) -> None:
    folder = write_checkpoint("llama", tmp_path / "llama")
    config = microbatch_config(folder, pipeline_layer_partition=(1, 3))
    prompts = make_prompts(250, LENGTHS)
    got, stats = run_and_stats(config, prompts)
    assert stats.max_batches_in_flight == 2 and stats.num_batches_in_flight == 0
    assert stats.num_preemptions == 0
    assert_same_outputs(generate(single_process(config), prompts), got)


def test_pp2_microbatches_with_preemption_equal_single_process(tmp_path) -> None:
    folder = write_checkpoint("llama", tmp_path / "llama")
    # 23 usable blocks of 4 tokens = 92 slots for 8 requests growing to 12..49 tokens.
    config = microbatch_config(folder, num_blocks=24)
    prompts = make_prompts(250, LENGTHS)
    got, stats = run_and_stats(config, prompts, max_tokens=12)
    assert stats.max_batches_in_flight == 2 and stats.num_preemptions > 0
    want = generate(single_process(config), prompts, max_tokens=12)
    assert_same_outputs(want, got)


def test_tp2_pp2_microbatches_equal_single_process(tmp_path) -> None:
    folder = write_checkpoint("qwen3", tmp_path / "qwen3")
    config = microbatch_config(folder, tp=2, num_blocks=32)
    prompts = make_prompts(256, LENGTHS)
    got, stats = run_and_stats(config, prompts, max_tokens=10)
    assert stats.max_batches_in_flight == 2 and stats.num_preemptions > 0
    want = generate(single_process(config), prompts, max_tokens=10)
    assert_same_outputs(want, got)


@pytest.mark.parametrize(("micro_batches", "num_blocks", "max_tokens"), [
    (3, 64, 8),
    (3, 24, 12),  # 23 usable blocks: preemption by recompute, as above
    (4, 64, 8),  # 2 x P: batches of 2 requests
])
def test_pp2_more_microbatches_than_stages_equal_single_process(tmp_path, micro_batches: int, num_blocks: int,
                                                                max_tokens: int) -> None:
    folder = write_checkpoint("llama", tmp_path / "llama")
    config = microbatch_config(folder, num_blocks=num_blocks, pipeline_micro_batches=micro_batches)
    prompts = make_prompts(250, LENGTHS)
    got, stats = run_and_stats(config, prompts, max_tokens=max_tokens)
    # 8 requests, max_num_seqs 8: batches of ceil(8 / D) requests, D of them in flight.
    assert stats.max_batches_in_flight == micro_batches and stats.num_batches_in_flight == 0
    assert (stats.num_preemptions > 0) == (num_blocks < 64)
    want = generate(single_process(config), prompts, max_tokens=max_tokens)
    assert_same_outputs(want, got)


# D = 3 needs 6 requests for 3 batches of 2 (each batch takes ceil(requests / D)).
@pytest.mark.parametrize(("micro_batches", "lengths"), [(None, (6, 9, 4, 12)), (3, (6, 9, 4, 12, 7, 10))])
def test_abort_while_batch_in_flight_leaks_no_blocks(tmp_path, micro_batches: int | None,
                                                     lengths: tuple[int, ...]) -> None:
    folder = write_checkpoint("llama", tmp_path / "llama")
    config = microbatch_config(folder, pipeline_micro_batches=micro_batches)
    depth = micro_batches or 2
    prompts = make_prompts(250, lengths)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    want = {}
    reference = LLMEngine(single_process(config))
    for request_id, prompt in prompts.items():
        reference.add_request(request_id, prompt, params)
    while reference.has_unfinished_requests():
        want.update({o.request_id: o.outputs[0].token_ids for o in reference.step() if o.finished})

    engine = LLMEngine(config)
    try:
        for request_id, prompt in prompts.items():
            engine.add_request(request_id, prompt, params)
        finals = {}
        victim = None
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    finals[out.request_id] = out
            in_flight = [r for r in prompts if r in engine.scheduler.in_flight]
            if victim is None and in_flight and engine.scheduler.requests[in_flight[0]].num_output_tokens >= 2:
                victim = in_flight[0]
                held = engine.kv_manager.get_block_ids(victim)
                engine.abort_request(victim)
                # Its batch is still on the ranks: the blocks stay held until it returns.
                assert engine.kv_manager.get_block_ids(victim) == held and held
        assert victim is not None, "no request was ever in flight between steps"
        assert engine.stats().max_batches_in_flight == depth
        assert engine.kv_manager.num_free_blocks == engine.num_blocks - 1, "KV blocks leaked"
        assert finals[victim].outputs[0].finish_reason is FinishReason.ABORT
        assert len(finals[victim].outputs[0].token_ids) < 10
        for request_id in prompts:
            if request_id != victim:
                assert finals[request_id].outputs[0].token_ids == want[request_id]
        # The engine keeps serving: a request reusing the aborted id runs to completion.
        engine.add_request(victim, prompts[victim], params)
        again = [o for _ in range(100) for o in engine.step() if o.finished]
        assert [o.outputs[0].token_ids for o in again] == [want[victim]]
        assert engine.kv_manager.num_free_blocks == engine.num_blocks - 1
    finally:
        engine.shutdown()


@pytest.mark.parametrize(("pp", "micro_batches", "message"), [
    (2, 1, r"pipeline_micro_batches must be in \[pipeline_parallel_size, 2 x pipeline_parallel_size\] = \[2, 4\], got 1"),
    (2, 5, r"pipeline_micro_batches must be in \[pipeline_parallel_size, 2 x pipeline_parallel_size\] = \[2, 4\], got 5"),
    (3, 7, r"= \[3, 6\], got 7"),
    (1, 2, r"pipeline_micro_batches must be None \(null\) or 1 with pipeline_parallel_size = 1, got 2"),
    (1, 0, r"pipeline_micro_batches must be >= 1, got 0"),  # the field's own range, checked first
    (2, True, r"pipeline_micro_batches must be an integer >= 1, got True"),
    (2, 2.5, r"pipeline_micro_batches must be an integer >= 1, got 2.5"),
])
def test_micro_batches_out_of_range_is_refused(pp: int, micro_batches: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ParallelConfig(pipeline_parallel_size=pp, pipeline_micro_batches=micro_batches)  # type: ignore[arg-type]


def test_micro_batches_resolve_to_the_engine_depth() -> None:
    assert ParallelConfig(pipeline_parallel_size=2).pipeline_depth == 2  # None: one batch per stage
    assert ParallelConfig(pipeline_parallel_size=2, pipeline_micro_batches=3).pipeline_depth == 3
    assert ParallelConfig(pipeline_parallel_size=3, pipeline_micro_batches=6).pipeline_depth == 6
    assert ParallelConfig().pipeline_depth == ParallelConfig(pipeline_micro_batches=1).pipeline_depth == 1
    # One stage: the knob changes nothing, async scheduling keeps its 2 batches, sync steps 1.
    model = ModelConfig(model="dummy:tiny-llama", dtype="float32", device="cpu")
    for async_scheduling, depth in ((None, 2), (False, 1)):
        config = EngineConfig(model=model, cache=CacheConfig(num_blocks=16),
                              scheduler=SchedulerConfig(async_scheduling=async_scheduling),
                              parallel=ParallelConfig(pipeline_micro_batches=1))
        assert LLMEngine(config).max_batches_in_flight == depth

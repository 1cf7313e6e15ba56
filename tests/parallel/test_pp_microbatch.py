"""Pipeline micro-batching: with PP = P the engine keeps up to P batches in flight.

Every run must give the single-process engine's greedy tokens and logprobs: varied prompt
lengths with prompts longer than a chunk (chunked prefill across batches), a KV pool small
enough to force preemption by recompute, PP 2 alone and TP 2 x PP 2 (4 gloo ranks). The
engine's `max_batches_in_flight` stat shows the queue actually held 2 batches. Aborting a
request while its batch is in flight leaks no KV block and leaves the other requests intact.
Runs that preempt compare sampled tokens and logprobs only: a request preempted in the middle
of its prompt reports some prompt logprobs twice (OutputProcessor appends the recomputed
chunks again), in one process as well, and where that happens depends on the batch timing.
"""

from __future__ import annotations

from dataclasses import replace

from parallel_helpers import (
    assert_same_outputs,
    engine_config,
    generate,
    make_prompts,
    run_engine,
    single_process,
    write_checkpoint,
)
from shardserve.workers.config import CacheConfig, EngineConfig, SchedulerConfig
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


def test_abort_while_batch_in_flight_leaks_no_blocks(tmp_path) -> None:
    folder = write_checkpoint("llama", tmp_path / "llama")
    config = microbatch_config(folder)
    prompts = make_prompts(250, (6, 9, 4, 12))
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
            in_flight = [r for r in prompts if engine.scheduler.is_in_flight(r)]
            if victim is None and in_flight and engine.scheduler.requests[in_flight[0]].num_output_tokens >= 2:
                victim = in_flight[0]
                held = engine.kv_manager.get_block_ids(victim)
                engine.abort_request(victim)
                # Its batch is still on the ranks: the blocks stay held until it returns.
                assert engine.kv_manager.get_block_ids(victim) == held and held
        assert victim is not None, "no request was ever in flight between steps"
        assert engine.stats().max_batches_in_flight == 2
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

"""TP = 2 through the multi-process executor equals the single-process engine.

Each model is written as a real safetensors folder; every rank loads only its slices. Greedy
tokens must be identical and the top-20 logprobs of every prompt and sampled position (log-
softmax of the logits) within 1e-4 in fp32. The Llama shape has 1 KV head (replicated on both
ranks), a vocab of 250 (padded to 256 and split 128 / 122 real rows) and a tied LM head.
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
from shardserve.workers.config import SchedulerConfig
from shardserve.workers.engine import LLMEngine


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_tp2_equals_single_process(name: str, tmp_path) -> None:
    folder = write_checkpoint(name, tmp_path / name)
    config = engine_config(folder, tp=2)
    prompts = make_prompts(250)
    want = generate(single_process(config), prompts)
    got = generate(config, prompts)
    assert_same_outputs(want, got)


def test_tp2_with_the_driver_two_steps_ahead(tmp_path) -> None:
    """SchedulerConfig.async_depth = 3: the driver keeps 3 batches in flight, so step N+2's
    message waits in each rank's pipe while N+1 runs (worker/proc.py's overlapped loop); the
    outputs still equal the single-process engine's."""
    folder = write_checkpoint("llama", tmp_path / "llama")
    base = engine_config(folder, tp=2)
    prompts = make_prompts(250)
    want = generate(single_process(base), prompts)
    engine = LLMEngine(replace(base, scheduler=SchedulerConfig(async_depth=3)))
    try:
        got = run_engine(engine, prompts)
        assert engine.stats().max_batches_in_flight == 3
    finally:
        engine.shutdown()
    assert_same_outputs(want, got)

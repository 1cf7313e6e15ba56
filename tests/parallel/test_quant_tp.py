"""Quantized weights under tensor parallelism 2 (gloo, CPU) equal one process.

Each case writes the tiny Llama checkpoint (parallel_helpers.py: 1 KV head replicated on both
ranks, vocab not divisible by the TP padding) and either quantizes it at load (int8 / int4 / fp8)
(fp8 at load takes int8's path: whole rows read, then sliced) or rewrites it as a GPTQ / AWQ / compressed-tensors folder (tests/quant_folders.py), so packed
qweight / qzeros / scales / per-tensor scales are sliced by rank. Greedy tokens must be identical
and logprobs within 1e-4 of the single-process run of the same quantized model (float activations,
parallel_helpers.py). Under `cpu_activations: auto` every rank resolves int8 on its kernel layers and
reports it at start-up (RankReady): the engine's config and stats say int8, and the group serves.
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
from quant_folders import quantize_folder
from shardserve.workers.engine import LLMEngine


def _quantized(config, **model):
    return replace(config, model=replace(config.model, **model))


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_at_load_tp2_equals_single_process(method: str, tmp_path) -> None:
    folder = write_checkpoint("llama", tmp_path / "llama")
    config = _quantized(engine_config(folder, tp=2), quantization=method, quantization_group_size=32)
    prompts = make_prompts(250)
    assert_same_outputs(generate(single_process(config), prompts), generate(config, prompts))


@pytest.mark.parametrize("method, options", [("gptq", {"sym": False}), ("awq", {}),
                                             ("fp8", {"strategy": "tensor"})])
def test_quantized_folder_tp2_equals_single_process(method: str, options: dict, tmp_path) -> None:
    folder = quantize_folder(write_checkpoint("llama", tmp_path / "llama"), tmp_path / method, method, **options)
    config = engine_config(folder, tp=2)
    prompts = make_prompts(250)
    assert_same_outputs(generate(single_process(config), prompts), generate(config, prompts))


def test_auto_cpu_activations_resolve_to_int8_on_every_rank(tmp_path) -> None:
    folder = write_checkpoint("llama", tmp_path / "llama")
    config = _quantized(engine_config(folder, tp=2), quantization="int8", cpu_activations="auto")
    engine = LLMEngine(config)
    try:
        assert engine.config.model.cpu_activations == "int8" and engine.stats().cpu_activations == "int8"
        out = run_engine(engine, make_prompts(250, lengths=(5,)), max_tokens=2, logprobs=False)
        assert [len(ids) for ids in out.token_ids.values()] == [2]
    finally:
        engine.shutdown()

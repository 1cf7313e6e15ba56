"""MoE experts quantized at load under tensor and expert parallelism (gloo, CPU) equal one process.

The tiny Qwen3-MoE of parallel_helpers.py (6 experts, a dense second layer) with the experts' and
the dense MLP's intermediate sizes raised (64 / 128) so INT4 groups of 32 split whole over 2 ranks.
TP 2 with INT4 g32: every rank holds half of each expert's intermediate features, so its down
projection is read whole, rounded, and its half of the groups kept (workers/quant/experts.py).
EP 2 over TP 2 with INT8: each rank rounds only its 3 experts, per channel. Greedy tokens must be
identical and logprobs within 1e-4 of the single-process run of the same quantized model.
Pre-quantized folders (tests/quant_folders.py): GPTQ g32 asymmetric under TP 2 (each rank reads its
rows of gate / up and its whole groups of down's packed inputs, scales and zeros) and compressed-tensors
W4A16 under EP 2 (each rank reads only its experts' tensors), against one process on the same folder.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from parallel_helpers import (
    assert_same_outputs,
    engine_config,
    generate,
    make_prompts,
    single_process,
    tiny_config,
)
from quant_folders import quantize_folder
from transformers import AutoModelForCausalLM


def _write_moe_checkpoint(folder):
    torch.manual_seed(0)
    config = tiny_config("qwen3_moe")
    config.intermediate_size, config.moe_intermediate_size = 128, 64
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(("method", "tp", "ep"), [("int4", 2, 1), ("int8", 2, 2)])
def test_quantized_experts_tp_ep_equal_single_process(method: str, tp: int, ep: int, tmp_path) -> None:
    folder = _write_moe_checkpoint(tmp_path / "qwen3_moe")
    config = engine_config(folder, tp=tp, ep=ep)
    config = replace(config, model=replace(config.model, quantization=method, quantization_group_size=32))
    prompts = make_prompts(256)
    assert_same_outputs(generate(single_process(config), prompts), generate(config, prompts))


@pytest.mark.parametrize(("method", "tp", "ep"), [("gptq", 2, 1), ("packed", 2, 2)])
def test_prequantized_experts_tp_ep_equal_single_process(method: str, tp: int, ep: int, tmp_path) -> None:
    folder = quantize_folder(_write_moe_checkpoint(tmp_path / "qwen3_moe"), tmp_path / method, method,
                             group_size=32, sym=False)
    config = engine_config(folder, tp=tp, ep=ep)
    prompts = make_prompts(256)
    assert_same_outputs(generate(single_process(config), prompts), generate(config, prompts))

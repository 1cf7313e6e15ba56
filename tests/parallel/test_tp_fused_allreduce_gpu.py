"""TP 2 on 2 GPUs with the fused all-reduce + RMSNorm kernel: the same outputs as without it.

Models: a dense Llama, Qwen3 (q/k norm) and a Qwen3-MoE with one dense layer (the MoE block's
output is reduced in the next norm too, on its all-reduce path).

The fused kernel sums the two ranks' partial rows in fp32 in rank order and then runs the
`rmsnorm` kernel's arithmetic; the unfused path all-reduces (PyTorch's one-shot kernel, a + b)
and then runs `rmsnorm`. At 2 ranks both are the same operations on the same values, so greedy
tokens and logprobs, prompt logprobs included, must be identical (float32 and bfloat16), and
in float32 also equal to one GPU within the CPU tests' tolerance. The worker log must say which
path ran. Skipped without 2 CUDA devices (GPU machine only).
"""

from __future__ import annotations

import gc
from dataclasses import replace

import pytest
import torch
from parallel_helpers import (
    assert_same_outputs,
    engine_config,
    generate,
    make_prompts,
    single_process,
    write_checkpoint,
)
from shardserve.workers.config import ModelConfig

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")]


def _run(model, dtype: str, tp: int, prompts, **kernels):
    """kernels: ParallelConfig's kernel switches (fused_allreduce_norm, fused_allreduce_protocol)."""
    config = engine_config(model, tp=tp)
    config = replace(config, model=ModelConfig(model=str(model), dtype=dtype, device="cuda"),
                     parallel=replace(config.parallel, **kernels))
    try:
        return generate(config if tp > 1 else single_process(config), prompts, max_tokens=12)
    finally:
        gc.collect()
        torch.cuda.empty_cache()


@pytest.mark.parametrize("name", ["llama", "qwen3", "qwen3_moe"])  # qwen3_moe: MoE + dense layers
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_equals_unfused_on_two_gpus(tmp_path, capfd, name: str, dtype: str) -> None:
    model = write_checkpoint(name, tmp_path / name)
    prompts = make_prompts(250, lengths=(1, 5, 11, 23, 64))
    unfused = _run(model, dtype, 2, prompts, fused_allreduce_norm=False)
    assert "fused with RMSNorm: off" in capfd.readouterr().err
    fused = _run(model, dtype, 2, prompts)
    assert "fused with RMSNorm: on" in capfd.readouterr().err
    assert_same_outputs(unfused, fused, atol=0.0)
    if dtype == "float32":
        assert_same_outputs(_run(model, dtype, 1, prompts), fused, atol=1e-4)


@pytest.mark.parametrize("name", ["llama", "qwen3_moe"])
def test_flags_protocol_equals_unfused_on_two_gpus(tmp_path, capfd, name: str) -> None:
    """The flag protocol (the default is Lamport: the data is its own flag) gives the same bits as well."""
    model = write_checkpoint(name, tmp_path / name)
    prompts = make_prompts(250, lengths=(1, 5, 11, 23, 64))
    unfused = _run(model, "bfloat16", 2, prompts, fused_allreduce_norm=False)
    fused = _run(model, "bfloat16", 2, prompts, fused_allreduce_protocol="flags")
    assert "fused with RMSNorm: on (flags)" in capfd.readouterr().err
    assert_same_outputs(unfused, fused, atol=0.0)

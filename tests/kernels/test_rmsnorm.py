"""Fused residual-add RMSNorm kernel vs its torch reference and the Hugging Face formula."""

from __future__ import annotations

import pytest
import torch
from kernel_env import DEVICE, ELEMENTWISE_DTYPES
from shardserve.parallel.kernels.rmsnorm import rmsnorm
from shardserve.workers.kernels import reference

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1.6e-2, 2**-6)}  # bf16: two ulps (interpreter casts truncate)


@pytest.mark.parametrize("dtype", ELEMENTWISE_DTYPES)
@pytest.mark.parametrize("hidden_size", [64, 96, 576])  # 576: SmolLM2-135M, not a power of two
@pytest.mark.parametrize("with_residual", [False, True])
def test_rmsnorm_matches_reference(device, dtype, hidden_size, with_residual):
    x = (3 * torch.randn(7, hidden_size)).to(dtype=dtype, device=device)
    weight = (1 + 0.1 * torch.randn(hidden_size)).to(dtype=dtype, device=device)
    residual = torch.randn(7, hidden_size).to(dtype=dtype, device=device) if with_residual else None
    out, new_residual = rmsnorm(x, weight, 1e-6, residual)
    ref_out, ref_residual = reference.rmsnorm(x, weight, 1e-6, residual)
    atol, rtol = TOL[dtype]
    assert out.dtype == dtype and new_residual.dtype == dtype
    # x + residual is rounded once, like torch. The interpreter's fp32 -> bf16 cast truncates
    # where the GPU (and torch) round to nearest even, so there it may differ by one bf16 ulp.
    residual_rtol = 2**-7 if dtype == torch.bfloat16 and DEVICE == "cpu" else 0.0
    torch.testing.assert_close(new_residual, ref_residual, atol=0, rtol=residual_rtol)
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)
    if residual is None:
        assert new_residual is x


def test_rmsnorm_equals_llama_rmsnorm_formula(device):
    # Hugging Face LlamaRMSNorm in fp32, written out, on a strided row view of a wider buffer.
    buf = torch.randn(5, 200, device=device)
    x, residual = buf[:, :80], buf[:, 100:180]
    weight = torch.randn(80, device=device)
    out, new_residual = rmsnorm(x, weight, 1e-5, residual)
    h = x + residual
    expected = weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5))
    torch.testing.assert_close(new_residual, h)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_rmsnorm_rejects_wrong_weight(device):
    with pytest.raises(ValueError, match="weight"):
        rmsnorm(torch.randn(2, 8, device=device), torch.ones(9, device=device), 1e-6)

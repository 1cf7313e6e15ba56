"""Decode-size linears vs torch: small_m_linear (GEMV with fused residual-add RMSNorm and
SiLU-and-mul) against the unfused references it replaces (reference.rmsnorm -> matmul ->
reference.silu_and_mul), and splitk_gemv (K split across programs) against a matmul."""

from __future__ import annotations

import pytest
import torch
from kernel_env import ATTENTION_DTYPES
from shardserve.workers.kernels import reference
from shardserve.workers.kernels.small_m_linear import MAX_ROWS, GemvTiles, small_m_linear
from shardserve.workers.kernels.splitk_gemv import SplitKTiles, splitk_gemv

# The interpreter's tl.dot multiplies bf16 as raw integers, so bf16 runs compiled only (like attention).
DTYPES = ATTENTION_DTYPES
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


def _unfused(x, weight, norm_weight, eps, residual, silu_mul):
    new_residual = None
    a = x
    if norm_weight is not None:
        a, new_residual = reference.rmsnorm(x, norm_weight, eps, residual)
    y = (a.float() @ weight.float().t()).to(x.dtype)
    if silu_mul:
        y = reference.silu_and_mul(y)
    return y, (new_residual if residual is not None else None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, MAX_ROWS])
@pytest.mark.parametrize("fusion", ["plain", "norm", "norm+residual", "norm+residual+silu"])
def test_matches_unfused(device, dtype, rows, fusion):
    k, n = 96, 80  # neither a multiple of the interpreter's tiles (16 x 32)
    x = torch.randn(rows, k).to(dtype=dtype, device=device)
    weight = (torch.randn(n, k) / k**0.5).to(dtype=dtype, device=device)
    norm_weight = (1 + 0.1 * torch.randn(k)).to(dtype=dtype, device=device) if "norm" in fusion else None
    residual = torch.randn(rows, k).to(dtype=dtype, device=device) if "residual" in fusion else None
    silu_mul = "silu" in fusion
    out, new_residual = small_m_linear(x, weight, norm_weight, 1e-6, residual, silu_mul)
    ref, ref_residual = _unfused(x, weight, norm_weight, 1e-6, residual, silu_mul)
    assert out.shape == (rows, n // 2 if silu_mul else n) and out.dtype == dtype
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    if residual is None:
        assert new_residual is None
    else:
        torch.testing.assert_close(new_residual, ref_residual, atol=atol, rtol=rtol)


def test_strided_rows_and_other_tiles(device):
    # Rows of a wider buffer (a padded graph buffer's view) and a tile wider than N.
    buf = torch.randn(4, 200, device=device)
    x, residual = buf[:, :64], buf[:, 100:164]
    weight = torch.randn(40, 64, device=device)
    norm_weight = torch.rand(64, device=device) + 0.5
    tiles = GemvTiles(block_n=64, block_k=16, num_warps=4, num_stages=1)
    out, new_residual = small_m_linear(x, weight, norm_weight, 1e-5, residual, tiles=tiles)
    ref, ref_residual = _unfused(x, weight, norm_weight, 1e-5, residual, False)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(new_residual, ref_residual)


def test_rejects_bad_shapes(device):
    x = torch.randn(2, 32, device=device)
    with pytest.raises(ValueError, match="at most 16 rows"):
        small_m_linear(torch.randn(MAX_ROWS + 1, 32, device=device), torch.randn(8, 32, device=device))
    with pytest.raises(ValueError, match="does not match"):
        small_m_linear(x, torch.randn(8, 16, device=device))
    with pytest.raises(ValueError, match="needs norm_weight"):
        small_m_linear(x, torch.randn(8, 32, device=device), residual=torch.randn(2, 32, device=device))
    with pytest.raises(ValueError, match="even number"):
        small_m_linear(x, torch.randn(7, 32, device=device), silu_mul=True)


# ---- splitk_gemv: the plain linear at decode sizes, K split across programs ----


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5, 16])
@pytest.mark.parametrize("split_k", [1, 3, 4])  # 3: the last split is shorter (K = 96 = 3 x 32)
def test_splitk_gemv_matches_matmul(device, dtype, rows, split_k):
    k, n = 96, 40
    x = torch.randn(rows, k).to(dtype=dtype, device=device)
    weight = (torch.randn(n, k) / k**0.5).to(dtype=dtype, device=device)
    out = splitk_gemv(x, weight, SplitKTiles(16, 32, split_k, 4, 1))
    ref = (x.float() @ weight.float().t()).to(dtype)
    atol, rtol = TOL[dtype]
    assert out.shape == (rows, n) and out.dtype == dtype
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)


def test_splitk_gemv_more_splits_than_chunks_and_bad_input(device):
    x, weight = torch.randn(2, 64, device=device), torch.randn(24, 64, device=device)
    out = splitk_gemv(x, weight, SplitKTiles(16, 32, 8, 4, 1))  # 64 = 2 chunks: only 2 splits run
    torch.testing.assert_close(out, x @ weight.t(), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="at most 16 rows"):
        splitk_gemv(torch.randn(17, 64, device=device), weight)
    with pytest.raises(ValueError, match="does not match"):
        splitk_gemv(x, torch.randn(24, 32, device=device))

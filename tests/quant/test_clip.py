"""The clipping search (algorithms/clip.py) and GPTQ's static groups on small random layers.

Weights with outliers (a few large values per group, as real checkpoints have) make min-max grids
coarse: the searched grid must lower the error it minimises — the weight error without data, the
output error x (w - q)^T with the group's input second moment — and never raise it; a factor
below 1 must actually be chosen on such weights (so the search is not a no-op).
"""

from __future__ import annotations

import pytest
import torch
from shardserve.workers.quant.algorithms.clip import (
    OUTPUT_MSE,
    WEIGHT_MSE,
    ClipSearch,
    clipped_grid,
    clipped_grouped,
)
from shardserve.workers.quant.algorithms.gptq import Hessian, gptq_quantize
from shardserve.workers.quant.algorithms.rtn import group_grid, quantize_to_grid, rtn_grouped
from shardserve.workers.quant.formats.gptq import GptqLayout
from test_algorithms import correlated_inputs, output_error


def weights_with_outliers(n: int, k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.02
    mask = torch.rand(n, k, generator=gen) < 0.01
    return torch.where(mask, w * 8, w)


def dequant(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    q = quantize_to_grid(w, scale[:, None], zero[:, None], bits).float()
    return (q - zero[:, None]) * scale[:, None]


@pytest.mark.parametrize("sym", [True, False])
def test_weight_error_search_beats_min_max(sym: bool) -> None:
    w = weights_with_outliers(256, 128)
    base = dequant(w, *group_grid(w, 4, sym), 4)
    scale, zero = clipped_grid(w, 4, sym, WEIGHT_MSE)
    clipped = dequant(w, scale, zero, 4)
    row_error = (clipped - w).abs().pow(2.4).sum(1)
    assert bool((row_error <= (base - w).abs().pow(2.4).sum(1) + 1e-12).all())  # p = 1 is a candidate
    assert float(row_error.sum()) < 0.95 * float((base - w).abs().pow(2.4).sum())
    assert bool((scale < group_grid(w, 4, sym)[0] - 1e-9).any())  # some rows clipped
    # the coarse-to-fine search lands within 1 % of the exhaustive one
    exhaustive = dequant(w, *clipped_grid(w, 4, sym, ClipSearch(coarse=1)), 4)
    assert float(row_error.sum()) <= 1.01 * float((exhaustive - w).abs().pow(2.4).sum())


def test_output_error_search_uses_the_inputs() -> None:
    x = correlated_inputs(512, 128, seed=2)
    w = weights_with_outliers(96, 128, seed=3)
    hessian = x.T @ x / x.shape[0]
    searched = clipped_grouped(w, 32, 4, False, OUTPUT_MSE, hessian)
    by_weight = clipped_grouped(w, 32, 4, False, OUTPUT_MSE)
    rtn = rtn_grouped(w, 32, 4, sym=False)
    assert output_error(x, w, searched.dequantize()) < output_error(x, w, rtn.dequantize())
    assert output_error(x, w, searched.dequantize()) <= output_error(x, w, by_weight.dequantize()) + 1e-6
    assert searched.scales.shape == (96, 4) and int(searched.q.max()) <= 15


def test_clip_search_refuses_bad_settings() -> None:
    with pytest.raises(ValueError, match="max_shrink must be in"):
        ClipSearch(max_shrink=1.0)
    with pytest.raises(ValueError, match="norm must be > 0"):
        ClipSearch(norm=0)


@pytest.mark.parametrize("clip", [None, WEIGHT_MSE])
def test_gptq_static_groups_with_act_order_need_no_perm(clip) -> None:
    n, k, g = 64, 256, 64
    x = correlated_inputs(1024, k, seed=5)
    w = weights_with_outliers(n, k, seed=6)
    hessian = Hessian(k)
    hessian.add(x)
    q = gptq_quantize(w, hessian.matrix, 4, g, sym=False, desc_act=True, clip=clip, static_groups=True)
    assert q.perm is None  # groups are consecutive inputs: g_idx = k // g
    packed = GptqLayout(4, g).pack(q)
    assert torch.equal(packed["g_idx"], torch.arange(k, dtype=torch.int32) // g)
    rtn_error = output_error(x, w, rtn_grouped(w, g, 4, sym=False).dequantize())
    assert output_error(x, w, q.dequantize()) < 0.9 * rtn_error


@pytest.mark.parametrize("clip_error", ["weight", "energy", "output"])
def test_gptq_clip_errors(clip_error: str) -> None:
    n, k, g = 64, 256, 64
    x = correlated_inputs(1024, k, seed=7)
    w = weights_with_outliers(n, k, seed=8)
    hessian = Hessian(k)
    hessian.add(x)
    q = gptq_quantize(w, hessian.matrix, 4, g, sym=False, desc_act=True, clip=WEIGHT_MSE, clip_error=clip_error)
    plain = gptq_quantize(w, hessian.matrix, 4, g, sym=False, desc_act=True)
    assert not torch.equal(q.scales, plain.scales)  # the search changed some grids
    rtn_error = output_error(x, w, rtn_grouped(w, g, 4, sym=False).dequantize())
    assert output_error(x, w, q.dequantize()) < 0.9 * rtn_error
    with pytest.raises(ValueError, match="clip_error must be one of"):
        gptq_quantize(w, hessian.matrix, 4, g, clip=WEIGHT_MSE, clip_error="l1")

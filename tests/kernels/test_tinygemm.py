"""torch's INT4 kernel path (workers/quant/kernels/tinygemm.py) vs x @ w.dequantize().T.

On CPU: where the path applies (`supported`, the packing width per K). On CUDA
(SHARDSERVE_KERNEL_DEVICE=cuda, or any run with a GPU): torch's packing and kernel, and the
engine's dual packing (torch's kernel up to TINY_MAX_ROWS rows, the plane kernels above), at decode
and prefill row counts, with act-order and bias.
"""

from __future__ import annotations

import pytest
import torch
from shardserve.workers.quant.kernels import tinygemm as tg
from shardserve.workers.quant.weights import Int4Weight


def _weight(n, k, group, device, act_order=False):
    scales = torch.rand(n, k // group, device=device) * 0.02 + 0.005
    mins = -torch.rand(n, k // group, device=device) * 16 * scales
    perm = torch.randperm(k, device=device) if act_order else None
    return Int4Weight(torch.randint(0, 16, (n, k), dtype=torch.uint8, device=device), scales, mins, group, perm)


def test_supported_says_where_it_runs():
    w = _weight(64, 256, 128, torch.device("cpu"))
    assert not tg.supported(w, torch.device("cpu"), torch.bfloat16)
    assert tg.inner_k_tiles_for(576) == 4 and tg.inner_k_tiles_for(4096) == 8 and tg.inner_k_tiles_for(40) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's int4 kernel runs on CUDA only")
@pytest.mark.parametrize("rows", [1, 3, 16, 40])
@pytest.mark.parametrize("act_order", [False, True])
def test_tiny_linear_on_cuda(rows, act_order):
    dev = torch.device("cuda")
    w = _weight(96, 512, 128, dev, act_order)
    assert tg.supported(w, dev, torch.bfloat16)
    assert not tg.supported(w, dev, torch.float16)
    p = tg.pack_tiny(w)
    x = torch.randn(rows, 512, device=dev, dtype=torch.bfloat16)
    bias = torch.randn(96, device=dev, dtype=torch.bfloat16)
    ref = x.float() @ w.dequantize().T + bias.float()
    for out in (tg.tiny_linear(x, p, bias), tg.dual_linear(x, tg.pack_dual(w, torch.bfloat16), bias)):
        assert (out.float() - ref).abs().max().item() <= 1.5e-2 * ref.abs().max().item()

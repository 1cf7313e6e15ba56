"""torch's INT4 kernel path (workers/quant/kernels/tinygemm.py) vs x @ w.dequantize().T.

Under Triton's interpreter (CI): the dequantize kernel over blocks in a layout given by a random
permutation of each 8 x BK block (the kernel may only follow `where`, never assume an order), for
2, 4 and 8 k-tiles a block and several groups, rows past a whole program, against the reference.
On CUDA (SHARDSERVE_KERNEL_DEVICE=cuda): torch's packing read by `block_layout`, torch's kernel at
decode rows and the dequantize + cuBLAS path above TINY_MAX_ROWS, with act-order and bias; the
engine's dual packing (torch's kernel, then the planes) on the same rows.
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


def _pack_by(where: torch.Tensor, q: torch.Tensor, bk: int) -> torch.Tensor:
    """Words [N / 8 * K / BK * BK] int32 holding q's codes where `where` says (the layout under test)."""
    n, k = q.shape
    blocks = q.view(n // 8, 8, k // bk, bk).permute(0, 2, 1, 3).reshape(-1, 8 * bk).long()
    nibbles = torch.zeros_like(blocks)
    nibbles[:, where.long()] = blocks  # element e sits at nibble where[e]
    nibbles = nibbles.view(-1, 8) << (4 * torch.arange(8))
    words = nibbles.sum(dim=1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


@pytest.mark.parametrize("tiles,group", [(2, 64), (4, 32), (8, 128), (8, 32)])
def test_dequantize_follows_the_block_layout(tiles, group, device):
    n, bk = 40, 16 * tiles  # 40 rows: one whole program of 32 and a part
    k = 2 * max(bk, group)
    w = _weight(n, k, group, torch.device("cpu"))
    where = torch.randperm(8 * bk).to(torch.int32)
    words = _pack_by(where, w.q, bk)
    zeros = w.mins + 8 * w.scales
    sz = torch.stack([w.scales.t(), zeros.t()], dim=2).to(torch.bfloat16).contiguous()
    out = tg.dequantize_words(words.to(device), where.to(device), sz.to(device), n, k, group, tiles)
    ref = ((w.q.float() - 8) * sz[..., 0].float().t().repeat_interleave(group, 1)
           + sz[..., 1].float().t().repeat_interleave(group, 1))
    torch.testing.assert_close(out.float().cpu(), ref, rtol=8e-3, atol=1e-3)  # one bf16 rounding


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
    p = tg.pack_tiny(w)
    x = torch.randn(rows, 512, device=dev, dtype=torch.bfloat16)
    bias = torch.randn(96, device=dev, dtype=torch.bfloat16)
    ref = x.float() @ w.dequantize().T + bias.float()
    for out in (tg.tiny_linear(x, p, bias), tg.dual_linear(x, tg.pack_dual(w, torch.bfloat16), bias)):
        assert (out.float() - ref).abs().max().item() <= 1.5e-2 * ref.abs().max().item()

"""INT8 weight-only linear (W8A16, per-channel scales) on CUDA: packing at load, then one kernel a call.

Data flow: an `Int8Weight` (int8 codes [N, K], fp32 scales [N]) is packed once by `pack_int8` into
the plane layout of packed.py with 8-bit fields: u = q + 128 (offset binary), four codes an int32
word, chunks of 4 x 128 columns; one "group" spanning all of K, scale s and min -128 s per row (so
w = u s + m = q s). `int8_linear` runs the matrix-vector kernel for up to packed.GEMV_MAX_ROWS rows
(per-channel: it accumulates sum f x and sum x and applies the row's scale once at the end), the
split-K tl.dot GEMM of int8_gemm.py (the codes u - 128 fed to tl.dot, the scale applied once) up to
packed.DEQUANT_MIN_ROWS - 1 rows, and W dequantized + cuBLAS above (packed.plane_linear).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from shardserve.workers.quant.kernels.packed import (
    GemmTiles,
    GemvTiles,
    PlaneWeights,
    pack_planes,
    pad_groups,
    plane_linear,
)
from shardserve.workers.quant.kernels.splitk import SplitTiles
from shardserve.workers.quant.weights import Int8Weight

PLANE = 128  # columns per plane: 512-byte rows of words per chunk (4 x 128 columns)


@dataclass(frozen=True)
class Int8Packed:
    """The runtime form of one INT8 linear."""

    weights: PlaneWeights

    @property
    def shape(self) -> tuple[int, int]:
        return self.weights.n, self.weights.k


def pack_int8(w: Int8Weight, dtype: torch.dtype) -> Int8Packed:
    """Int8Weight -> Int8Packed for activations of `dtype` (bf16 / fp16), on w's device."""
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"int8 activations must be bfloat16 or float16, got {dtype}")
    if w.q.dtype != torch.int8 or w.q.dim() != 2:
        raise ValueError(f"int8 codes must be an int8 [N, K] tensor, got {w.q.dtype} {tuple(w.q.shape)}")
    n, k = w.q.shape
    if tuple(w.scales.shape) != (n,):
        raise ValueError(f"int8 scales have shape {tuple(w.scales.shape)}, expected ({n},)")
    words = pack_planes((w.q.to(torch.int16) + 128).to(torch.uint8), 8, PLANE)
    k_pad = words.shape[1] * 4
    scales = w.scales.float().view(n, 1)
    weights = PlaneWeights(words, pad_groups(scales, 1, dtype), pad_groups(-128.0 * scales, 1, dtype),
                           bits=8, plane=PLANE, group_size=k_pad, k=k)
    return Int8Packed(weights)


def int8_linear(x: torch.Tensor, packed: Int8Packed, bias: torch.Tensor | None = None,
                gemv_tiles: GemvTiles | None = None, gemm_tiles: GemmTiles | None = None,
                split_tiles: SplitTiles | None = None, silu_mul: bool = False) -> torch.Tensor:
    """x [M, K] bf16/fp16 -> x @ W^T + bias [M, N] (W = the Int8Weight's dequantize())."""
    return plane_linear(x, packed.weights, bias, gemv_tiles, gemm_tiles, split_tiles, silu_mul)

"""INT4 weight-only linear (W4A16, group-wise scales and mins) on CUDA: packing at load, then one kernel a call.

Data flow: an `Int4Weight` (codes 0..15, fp32 scales and mins [N, G], optional act-order perm) is
packed once by `pack_int4` into the plane layout of packed.py: eight codes an int32 word, a chunk of
PLANE words holding 8 x PLANE consecutive columns as 8 planes of PLANE columns, PLANE = the largest
power of two <= 32 dividing the group size (so a plane needs one scale and one min a row); scales and
mins transposed to [G, N] in the activation dtype. `int4_linear` permutes x for act-order
(index_select: shape-static, graph-safe), then runs the matrix-vector kernel for up to
packed.GEMV_MAX_ROWS rows (decode) or the tl.dot GEMMs (w4a16.py for batches, codes_gemm.py's split-K
below them); all dequantize in registers, accumulate in fp32 and read each packed byte once per tile.
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
from shardserve.workers.quant.kernels.w4a16 import W4Tiles
from shardserve.workers.quant.kernels.w4a16_pairs import pair_order
from shardserve.workers.quant.weights import Int4Weight

MAX_PLANE = 128  # widest plane: 512-byte rows of words per chunk (8 x 128 columns)
DEFAULT_PLANE = 32  # the H100 sweep's best for the decode GEMV (128-byte rows of words per chunk)
MIN_PLANE = 16  # tl.dot's smallest K


@dataclass(frozen=True)
class Int4Packed:
    """The runtime form of one INT4 linear: the plane-layout weights and the act-order perm (or None)."""

    weights: PlaneWeights
    perm: torch.Tensor | None

    @property
    def shape(self) -> tuple[int, int]:
        return self.weights.n, self.weights.k


def plane_for(group_size: int, max_plane: int = MAX_PLANE) -> int:
    """The largest power of two <= max_plane that divides the group size (>= MIN_PLANE)."""
    plane = max_plane
    while plane >= MIN_PLANE:
        if group_size % plane == 0:
            return plane
        plane //= 2
    raise ValueError(f"int4 group_size {group_size} must be a multiple of {MIN_PLANE}")


def pack_int4(w: Int4Weight, dtype: torch.dtype, max_plane: int = DEFAULT_PLANE) -> Int4Packed:
    """Int4Weight -> Int4Packed for activations of `dtype` (bf16 / fp16), on w's device; planes of at
    most `max_plane` columns (a power of two >= 16)."""
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"int4 activations must be bfloat16 or float16, got {dtype}")
    if w.q.dtype != torch.uint8 or (w.q.numel() and int(w.q.max()) > 15):
        raise ValueError("int4 codes must be uint8 in 0..15")
    n, k = w.q.shape
    plane = plane_for(w.group_size, max_plane)
    words = pack_planes(w.q, 4, plane)
    groups = -(-(words.shape[1] * 8) // w.group_size)
    weights = PlaneWeights(words, pad_groups(w.scales, groups, dtype), pad_groups(w.mins, groups, dtype),
                           bits=4, plane=plane, group_size=w.group_size, k=k)
    perm = None if w.perm is None else w.perm.to(device=w.q.device, dtype=torch.int64).contiguous()
    if w.q.is_cuda and k % (8 * plane) == 0:  # w4a16_pairs.py's x order, made now: never first under graph capture
        pair_order(k, plane, w.q.device)
    return Int4Packed(weights, perm)


def int4_linear(x: torch.Tensor, packed: Int4Packed, bias: torch.Tensor | None = None,
                gemv_tiles: GemvTiles | None = None, gemm_tiles: GemmTiles | None = None,
                split_tiles: SplitTiles | None = None, silu_mul: bool = False,
                w4_tiles: W4Tiles | None = None) -> torch.Tensor:
    """x [M, K] bf16/fp16 -> x @ W^T + bias [M, N] (W = the Int4Weight's dequantize())."""
    if packed.perm is not None:
        if x.dim() != 2 or x.shape[1] != packed.perm.shape[0]:
            raise ValueError(f"x must be [M, {packed.perm.shape[0]}], got {tuple(x.shape)}")
        x = x.index_select(1, packed.perm)
    return plane_linear(x, packed.weights, bias, gemv_tiles, gemm_tiles, split_tiles, silu_mul, w4_tiles=w4_tiles)

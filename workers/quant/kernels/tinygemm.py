"""INT4 group-wise linear on CUDA through PyTorch's own tensor-core kernel (tinygemm), for bf16 activations.

Why: at decode sizes `torch._weight_int4pack_mm` (the kernel gpt-fast and torchao use) streams INT4
weights faster than this package's Triton GEMV (benchmarks/README.md), and ships inside torch itself.
Data flow: `pack_tiny` turns an `Int4Weight` (codes, scales, mins [N, G]) into torch's packed tensor
(`_convert_weight_to_int4pack`) plus [G, N, 2] (scale, zero) with w = (q - 8) * scale + zero, i.e.
zero = min + 8 scale; `tiny_linear` permutes x for act-order and runs the kernel. The kernel is slow
at prefill sizes and torch's packed layout is undocumented (no fast dequantize of it here), so the
engine holds an `Int4Dual`: this packing for up to TINY_MAX_ROWS rows beside int4.py's plane layout
(codes GEMM, dequantize + cuBLAS) for more. INT4 weights then take 1 byte a weight, not 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from shardserve.workers.quant.kernels.int4 import Int4Packed, int4_linear, pack_int4
from shardserve.workers.quant.weights import Int4Weight

TINY_MAX_ROWS = 8  # rows up to which the engine runs torch's kernel; above, int4.py's split-K GEMM was faster (H100 sweep)
GROUP_SIZES = (32, 64, 128, 256)  # what the kernel accepts
N_TILE = 8  # output rows of a packed block


@dataclass(frozen=True)
class TinyPacked:
    """torch's packed INT4 weight, its scales-and-zeros and the act-order perm (or None)."""

    words: torch.Tensor  # int32, torch's layout: [N / 8][K / BK][32][inner_k_tiles / 2]
    scales_zeros: torch.Tensor  # bf16 [G, N, 2]
    perm: torch.Tensor | None
    n: int
    k: int
    group_size: int
    inner_k_tiles: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.n, self.k


def inner_k_tiles_for(k: int) -> int | None:
    """The widest packing (8, 4 or 2 k-tiles of 16 columns per block) that divides K, or None."""
    for tiles in (8, 4, 2):
        if k % (16 * tiles) == 0:
            return tiles
    return None


def supported(w: Int4Weight, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's kernel takes this weight here: CUDA, bf16, 4-bit groups of 32-256, N % 8 == 0."""
    n, k = w.q.shape
    return (device.type == "cuda" and dtype == torch.bfloat16 and w.bits == 4 and hasattr(torch, "_weight_int4pack_mm")
            and w.group_size in GROUP_SIZES and k % w.group_size == 0 and n % N_TILE == 0
            and inner_k_tiles_for(k) is not None)


def pack_tiny(w: Int4Weight) -> TinyPacked:
    """Int4Weight (on a CUDA device) -> TinyPacked; the caller checked `supported`."""
    n, k = w.q.shape
    tiles = inner_k_tiles_for(k)
    q = w.q.to(torch.uint8)
    words = torch._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).contiguous(), tiles)
    zeros = w.mins + 8 * w.scales
    scales_zeros = torch.stack([w.scales.t(), zeros.t()], dim=2).to(torch.bfloat16).contiguous()
    perm = None if w.perm is None else w.perm.to(device=w.q.device, dtype=torch.int64).contiguous()
    return TinyPacked(words, scales_zeros, perm, n, k, w.group_size, tiles)


def tiny_linear(x: torch.Tensor, p: TinyPacked, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] bf16 -> x @ W^T + bias [M, N] (W = the Int4Weight's dequantize()) by torch's kernel."""
    if x.dim() != 2 or x.shape[1] != p.k or x.dtype != torch.bfloat16:
        raise ValueError(f"x must be bfloat16 [M, {p.k}], got {x.dtype} {tuple(x.shape)}")
    if p.perm is not None:
        x = x.index_select(1, p.perm)
    out = torch._weight_int4pack_mm(x.contiguous(), p.words, p.group_size, p.scales_zeros)
    return out if bias is None else out + bias


@dataclass(frozen=True)
class Int4Dual:
    """One INT4 weight in both layouts: torch's for decode rows, the planes for more."""

    tiny: TinyPacked
    planes: Int4Packed

    @property
    def shape(self) -> tuple[int, int]:
        return self.tiny.shape


def pack_dual(w: Int4Weight, dtype: torch.dtype) -> Int4Dual:
    return Int4Dual(pack_tiny(w), pack_int4(w, dtype))


def dual_linear(x: torch.Tensor, p: Int4Dual, bias: torch.Tensor | None = None) -> torch.Tensor:
    """torch's kernel up to TINY_MAX_ROWS rows, int4.py's kernels above."""
    if x.dim() == 2 and x.shape[0] <= TINY_MAX_ROWS:
        return tiny_linear(x, p.tiny, bias)
    return int4_linear(x, p.planes, bias)

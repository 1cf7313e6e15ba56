"""GGUF Q4_K / Q6_K weight-only linears on CUDA, exact: packed.py's planes with float32 scales and mins.

Data flow: a k-quant `GroupedWeight` (formats/gguf_kquant.py: Q4_K = 4-bit codes in groups of 32,
scale d*sc, min -dmin*m; Q6_K = 6-bit codes q in groups of 16, scale d*sc, min -32 * scale) is packed
once into the plane layout — Q4_K as 4-bit fields in planes of 32 (int4.py's layout), Q6_K as 8-bit
fields u = q in planes of 16 (a plane inside one group) — with scales and mins kept in float32 [G, N]:
d*sc needs up to 17 significant bits, which neither bf16 nor fp16 holds, so with the activation dtype
the layout would no longer be gguf-py's weights. `dequantize_planes(w, float32)` of these planes is
gguf-py's `dequantize` bit for bit (its exact mode: u * s + m, one rounding). The linears are
`plane_linear`: the matrix-vector kernel at decode rows (SiLU-and-mul epilogue for gate_up), the
split-K codes GEMM for Q4_K or the dequantizing tl.dot GEMM for Q6_K at small batches, W dequantized
+ cuBLAS from DEQUANT_MIN_ROWS rows (Q6_K: Q6K_DEQUANT_MIN_ROWS); activations bf16 / fp16, accumulation fp32. torch's tinygemm
(bf16 scales) is not used for Q4_K for the same reason. Bytes a weight: Q4_K 0.5 + 8 / 32 = 0.75,
Q6_K 1 + 8 / 16 = 1.5 (GGUF's own: 0.5625 and 0.8203).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from shardserve.workers.quant.kernels.int4 import Int4Packed
from shardserve.workers.quant.kernels.packed import PlaneWeights, pack_planes, pad_groups, plane_linear
from shardserve.workers.quant.weights import GroupedWeight

Q4K_PLANE, Q6K_PLANE = 32, 16
# Q6_K's dequantizing tl.dot GEMM on an H100, one Llama-3.1-8B layer: 282 us at 16 rows, 1,376 at 64, where
# dequantize + cuBLAS costs ~400-450 (INT8 planes, benchmarks/README.md): from 32 rows W is dequantized.
Q6K_DEQUANT_MIN_ROWS = 32


@dataclass(frozen=True)
class Q6kPacked:
    """The runtime form of one Q6_K linear: 8-bit planes of 16 columns, float32 group scales and mins."""

    weights: PlaneWeights

    @property
    def shape(self) -> tuple[int, int]:
        return self.weights.n, self.weights.k


def pack_q4k(w: GroupedWeight) -> Int4Packed:
    """A 4-bit weight in groups of 32 with float32 scales -> exact int4 planes (for int4.int4_linear)."""
    if w.bits != 4 or w.group_size != 32 or w.perm is not None:
        raise ValueError(f"pack_q4k takes 4-bit weights in groups of 32 without act-order, got bits={w.bits}, "
                         f"group_size {w.group_size}")
    return Int4Packed(_planes(w, 4, Q4K_PLANE, 15), None)


def pack_q6k(w: GroupedWeight) -> Q6kPacked:
    """A 6-bit weight in groups of 16 with float32 scales -> exact 8-bit planes (for `q6k_linear`)."""
    if w.bits != 6 or w.group_size != 16 or w.perm is not None:
        raise ValueError(f"pack_q6k takes 6-bit weights in groups of 16 without act-order, got bits={w.bits}, "
                         f"group_size {w.group_size}")
    return Q6kPacked(_planes(w, 8, Q6K_PLANE, 63))


def _planes(w: GroupedWeight, bits: int, plane: int, max_code: int) -> PlaneWeights:
    if w.q.dtype != torch.uint8 or (w.q.numel() and int(w.q.max()) > max_code):
        raise ValueError(f"k-quant codes must be uint8 in 0..{max_code}")
    words = pack_planes(w.q, bits, plane)
    groups = words.shape[1] * (32 // bits) // w.group_size
    return PlaneWeights(words, pad_groups(w.scales, groups, torch.float32), pad_groups(w.mins, groups, torch.float32),
                        bits=bits, plane=plane, group_size=w.group_size, k=w.q.shape[1])


def q6k_linear(x: torch.Tensor, packed: Q6kPacked, bias: torch.Tensor | None = None,
               silu_mul: bool = False, **tiles) -> torch.Tensor:
    """x [M, K] bf16/fp16 -> x @ W^T + bias [M, N] (W = the weight's dequantize()); from Q6K_DEQUANT_MIN_ROWS
    rows W is dequantized for cuBLAS (no split-K GEMM takes planes of 16)."""
    tiles.setdefault("dequant_min_rows", Q6K_DEQUANT_MIN_ROWS)
    return plane_linear(x, packed.weights, bias, silu_mul=silu_mul, **tiles)

"""GGUF Q6_K weight-only linear on CUDA: 6-bit codes in groups of 16, on packed.py's 8-bit planes.

Data flow: a 6-bit `GroupedWeight` (codes q 0..63, scale s = d*sc per 16 inputs, min -32 s: w = s (q - 32);
formats/gguf_kquant.py) is packed once by `pack_q6k` into the plane layout with 8-bit fields (u = q,
four codes an int32 word, planes of 16 columns so a plane lies inside one group), scales and mins [G, N]
in the activation dtype. `q6k_linear` is `plane_linear`: the matrix-vector kernel at decode rows, the
dequantizing tl.dot GEMM otherwise (the split-K GEMMs take INT4 groups and per-channel INT8 only), W
dequantized + cuBLAS from DEQUANT_MIN_ROWS rows. Q4_K needs nothing of its own on CUDA: it is a 4-bit
GroupedWeight in groups of 32, which int4.py (or tinygemm.py) takes as it is.
Scales and mins are rounded to the activation dtype, as in every CUDA layout here (bf16: ~0.4 % of a
weight), so unlike the CPU path this one is not bit-exact to gguf-py's fp32 `dequantize`.
"""

from __future__ import annotations

import torch
from shardserve.workers.quant.kernels.int8 import Int8Packed
from shardserve.workers.quant.kernels.packed import PlaneWeights, pack_planes, pad_groups, plane_linear
from shardserve.workers.quant.weights import GroupedWeight

PLANE = 16  # columns per plane: one group of 16


def pack_q6k(w: GroupedWeight, dtype: torch.dtype) -> Int8Packed:
    """A 6-bit weight in groups of 16 -> plane weights for activations of `dtype` (bf16 / fp16)."""
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"Q6_K activations must be bfloat16 or float16, got {dtype}")
    if w.bits != 6 or w.group_size != 16 or w.perm is not None:
        raise ValueError(f"pack_q6k takes 6-bit weights in groups of 16 without act-order, got bits={w.bits}, "
                         f"group_size {w.group_size}")
    if w.q.dtype != torch.uint8 or (w.q.numel() and int(w.q.max()) > 63):
        raise ValueError("Q6_K codes must be uint8 in 0..63")
    n, k = w.q.shape
    words = pack_planes(w.q, 8, PLANE)
    groups = words.shape[1] * 4 // 16
    weights = PlaneWeights(words, pad_groups(w.scales, groups, dtype), pad_groups(w.mins, groups, dtype),
                           bits=8, plane=PLANE, group_size=16, k=k)
    return Int8Packed(weights)


def q6k_linear(x: torch.Tensor, packed: Int8Packed, bias: torch.Tensor | None = None,
               silu_mul: bool = False, **tiles) -> torch.Tensor:
    """x [M, K] bf16/fp16 -> x @ W^T + bias [M, N] (W = the weight's dequantize())."""
    return plane_linear(x, packed.weights, bias, silu_mul=silu_mul, **tiles)

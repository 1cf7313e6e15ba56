"""Split-K matrix-vector product for decode batches of a few rows: `x [M, K] @ W[N, K]^T`, M <= 16.

Why: at batch 1..16 a linear layer only streams its weight once, so it runs at the memory
bandwidth if enough thread blocks are in flight. cuBLAS's choice for the mid-sized matrices of
a decoder layer (e.g. 4096 x 4096, the attention output projection of Llama-3.1-8B, or any
layer's slice under tensor parallelism) launches one block per 64 output rows — 64 blocks on a
132-SM H100 — and reaches about half the copy bandwidth (measured in a decode graph, see
benchmarks/gemv_gpu_check.py). Splitting K as well gives every SM several blocks.

Data flow: program (n, s) multiplies the `BLOCK_N` weight rows of tile n over the s-th K range
by the M activation rows (a tensor-core dot; padding rows masked) and stores the fp32 partial
`[M, BLOCK_N]` into `partial [S, M, N]`; `_splitk_reduce_kernel` sums the S partials of each
output element in fp32 and rounds once to the output dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_ROWS = 16  # one M tile of the tensor-core dot


@dataclass(frozen=True)
class SplitKTiles:
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 3


INTERPRETER_TILES = SplitKTiles(16, 32, 2, 4, 1)
DEFAULT_TILES = SplitKTiles(64, 256, 4, 4, 3)


@triton.jit
def _splitk_gemv_kernel(
    x_ptr, w_ptr, partial_ptr,
    M, N, K, k_per_split,
    stride_xm, stride_wn, stride_ps, stride_pm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0)
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :],
                    other=0.0)
        acc += tl.dot(a, tl.trans(w), input_precision="ieee")
    tl.store(partial_ptr + split * stride_ps + offs_m[:, None] * stride_pm + offs_n[None, :], acc,
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _splitk_reduce_kernel(partial_ptr, out_ptr, N, num_splits, stride_ps, stride_pm, stride_om,
                          BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(num_splits):
        acc += tl.load(partial_ptr + s * stride_ps + row * stride_pm + offs, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_om + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def splitk_gemv(x: torch.Tensor, weight: torch.Tensor, tiles: SplitKTiles | None = None) -> torch.Tensor:
    """`x @ weight.T` ([M, K] x [N, K] -> [M, N], M <= MAX_ROWS) accumulated in fp32."""
    if x.dim() != 2 or weight.dim() != 2 or x.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError("x [M, K] and weight [N, K] must be 2-D with a contiguous last dim")
    num_rows, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"weight {tuple(weight.shape)} does not match x {tuple(x.shape)}")
    if num_rows > MAX_ROWS:
        raise ValueError(f"splitk_gemv takes at most {MAX_ROWS} rows, got {num_rows}")
    out = torch.empty(num_rows, n, dtype=x.dtype, device=x.device)
    if num_rows == 0:
        return out
    t = tiles or (INTERPRETER_TILES if x.device.type != "cuda" else DEFAULT_TILES)
    # Each split covers a whole number of BLOCK_K chunks.
    k_per_split = triton.cdiv(triton.cdiv(k, t.split_k), t.block_k) * t.block_k
    splits = triton.cdiv(k, k_per_split)
    partial = torch.empty(splits, num_rows, n, dtype=torch.float32, device=x.device)
    _splitk_gemv_kernel[(triton.cdiv(n, t.block_n), splits)](
        x, weight, partial, num_rows, n, k, k_per_split,
        x.stride(0), weight.stride(0), partial.stride(0), partial.stride(1),
        BLOCK_M=MAX_ROWS, BLOCK_N=t.block_n, BLOCK_K=t.block_k, num_warps=t.num_warps, num_stages=t.num_stages,
    )
    block = min(1024, triton.next_power_of_2(n))
    _splitk_reduce_kernel[(num_rows, triton.cdiv(n, block))](
        partial, out, n, splits, partial.stride(0), partial.stride(1), out.stride(0), BLOCK=block, num_warps=4,
    )
    return out

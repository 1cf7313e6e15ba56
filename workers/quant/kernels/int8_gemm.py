"""Tensor-core split-K GEMM on 8-bit per-channel weights as stored (int8 or e4m3 codes [N, K], fp32 row scales).

Why: between one row (decode_linear's GEMV) and DEQUANT_MIN_ROWS rows (W dequantized + cuBLAS) the
GEMM is weight-bound: it must stream the codes once, over every SM. Program (m tile, n tile, split s)
walks its K steps of BLOCK_K = 128 columns: a [BLOCK_K, BLOCK_N] tile of codes (K contiguous in memory)
widened to the activation dtype (int8 is exact in bf16 / fp16) and fed to tl.dot with x's [BLOCK_M,
BLOCK_K] tile; the row scale multiplies the fp32 accumulator once at the end (no per-weight scale).
One split adds the bias and rounds; more write partials that splitk.py's reduce sums, biases and
rounds once. `dequantize_int8` writes W in the activation dtype (one rounding of q * s) for cuBLAS.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from shardserve.parallel.kernels.pdl import pdl_options, release_next, wait_for_previous
from shardserve.workers.quant.kernels.splitk import (
    INTERPRETER_SPLIT,
    SplitTiles,
    default_split_tiles,
    launch_split,
    sm_count_of,
    store_tile,
)

BLOCK_K = 128  # columns a K step (splitk.k_steps counts INT8 steps of 128)


@triton.jit(do_not_specialize=["M", "STEPS_PER_SPLIT"])  # one binary for every row count and split
def _int8_gemm_kernel(
    x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_om, STEPS_PER_SPLIT,
    BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, USE_PDL: tl.constexpr,
):
    """SPLIT: out_ptr is fp32 partials [splits, M, N] (no bias); else out [M, N] in x's dtype."""
    wait_for_previous(USE_PDL)  # parallel/kernels/pdl.py's protocol: nothing read before it
    release_next(USE_PDL)
    dtype = x_ptr.dtype.element_ty
    pid_m = tl.program_id(0)  # fastest: the M tiles of one weight tile run together (L2 reuse)
    pid_n = tl.program_id(1)
    first = tl.program_id(2) * STEPS_PER_SPLIT  # this split's K steps
    last = tl.minimum(first + STEPS_PER_SPLIT, tl.cdiv(K, BLOCK_K))
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    w_tile = w_ptr + offs_n[None, :].to(tl.int64) * K + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
    x_tile = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for t in range(first, last):
        k0 = t * BLOCK_K
        mask_k = k0 + offs_k < K
        w = tl.load(w_tile + k0, mask=mask_n[None, :] & mask_k[:, None], other=0.0)  # int8 or e4m3 codes
        xv = tl.load(x_tile + k0, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if w.dtype == tl.float8e4nv:
            w = w.to(tl.float32)  # e4m3 -> fp32 is the conversion decode_linear's kernel runs on GPUs
        acc = tl.dot(xv, w.to(dtype), acc)
    acc = acc * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    store_tile(acc, out_ptr, bias_ptr, offs_m, offs_n, mask_m, mask_n, M, N, stride_om, SPLIT, HAS_BIAS)


def int8_gemm(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
              out: torch.Tensor, tiles: SplitTiles) -> torch.Tensor:
    """out [M, N] = x [M, K] @ (codes * scales[:, None])^T + bias, K split `tiles.split_k` ways."""
    rows, n = out.shape
    k = codes.shape[1]

    def launch(grid: tuple[int, int, int], dest: torch.Tensor, per: int, split: bool) -> None:
        _int8_gemm_kernel[grid](
            x, codes, scales, bias if bias is not None else out, dest, rows, n, k, x.stride(0), out.stride(0), per,
            BLOCK_K=BLOCK_K, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, HAS_BIAS=bias is not None, SPLIT=split,
            num_warps=tiles.num_warps, num_stages=tiles.num_stages, **pdl_options(x.device),
        )

    return launch_split(launch, triton.cdiv(k, BLOCK_K), out, bias, tiles)


def gemm_8bit(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
              tiles: SplitTiles | None = None) -> torch.Tensor:
    """[M, N] in x's dtype = x @ (codes * scales[:, None])^T + bias: `int8_gemm` into a new tensor, with
    the tiles given, the interpreter's off CUDA, or the split-K heuristic's for 8-bit weights."""
    rows, (n, k) = x.shape[0], codes.shape
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    if rows == 0 or n == 0:
        return out
    t = tiles or (INTERPRETER_SPLIT if x.device.type != "cuda" else default_split_tiles(8, rows, n, k, sm_count_of(x.device)))
    return int8_gemm(x, codes, scales, bias, out, t)


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    at = offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
    s = tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0)
    w = tl.load(w_ptr + at, mask=mask, other=0).to(tl.float32) * s[:, None]
    tl.store(out_ptr + at, w.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_int8(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W [N, K] = codes * scales[:, None] in `dtype`, each weight rounded once (one kernel)."""
    n, k = codes.shape
    out = torch.empty(n, k, dtype=dtype, device=codes.device)
    block_n, block_k = 16, 256
    _dequant_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
        codes, scales, out, n, k, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return out

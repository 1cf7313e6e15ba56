"""Tensor-core GEMM on INT4 plane-layout weights (packed.py) fed with the raw codes: scales applied per group.

Why: packed.py's `qgemm` dequantizes every weight to w = u s + m before tl.dot (an unpack, an FMA and
a conversion a weight). Here a weight costs about one integer op: `(words >> 4p) & 0x000F000F |
MAGIC` holds two 16-bit numbers OFFSET + u at once, field p (plane p) in the low half and field
p + 4 (plane p + 4) in the high half (bf16: 0x4300 reads 128 + u; fp16: 0x6400 reads 1024 + u).
Per group g of the row n: sum_k x_k w_k = s sum_k x_k (OFFSET + u_k) + (m - OFFSET s) sum_k x_k, so
the kernel keeps one dot accumulator a group and the row sums of the x tiles it already holds.
On an H100 that made INT4 faster than `qgemm` at 16-64 rows only (and an INT8 variant slower:
benchmarks/README.md), so plane_linear uses it for INT4 between the GEMV's rows and
DEQUANT_MIN_ROWS. Program (m tile, n tile, K split) streams its [PLANE, BLOCK_N] word tiles over its
share of the K chunks (splitk.py: a chunk holds whole groups or lies inside one, and its group sums
are applied before the next chunk, so any split of the chunks is exact); Triton pipelines the word
and x tile loads over `num_stages`. fp32 accumulation; one split adds the bias and rounds at the
store, more write fp32 partials that splitk.py's reduce sums, biases and rounds once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from shardserve.parallel.kernels.pdl import pdl_options, release_next, wait_for_previous
from shardserve.workers.quant.kernels.splitk import SplitTiles, launch_split, store_tile


@triton.jit
def _apply_group(acc, acc_g, xs_g, s_ptr, m_ptr, g, offs_n, mask_n, OFFSET: tl.constexpr):
    """acc += s * acc_g + (m - OFFSET s) * row sums of x, for the group starting at row g * N of s / m."""
    s = tl.load(s_ptr + g + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + g + offs_n, mask=mask_n, other=0.0).to(tl.float32) - OFFSET * s
    return acc + acc_g * s[None, :] + xs_g[:, None] * m[None, :]


@triton.jit(do_not_specialize=["M", "STEPS_PER_SPLIT"])  # one binary for every row count and split
def _codes_gemm_kernel(
    x_ptr, w_ptr, s_ptr, m_ptr, bias_ptr, out_ptr, M, N, K, KW, stride_xm, stride_om, STEPS_PER_SPLIT,
    PLANE: tl.constexpr, GROUP: tl.constexpr, SCALE_EVERY: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """SPLIT: out_ptr is fp32 partials [splits, M, N] (no bias); else out [M, N] in x's dtype."""
    wait_for_previous(USE_PDL)  # parallel/kernels/pdl.py's protocol: nothing read before it
    release_next(USE_PDL)
    CHUNK: tl.constexpr = 8 * PLANE
    dtype = x_ptr.dtype.element_ty
    IS_BF16: tl.constexpr = dtype == tl.bfloat16
    MAGIC: tl.constexpr = 0x43004300 if IS_BF16 else 0x64006400  # two halves reading 128 + u (bf16) / 1024 + u (fp16)
    OFFSET: tl.constexpr = 128.0 if IS_BF16 else 1024.0
    pid_m = tl.program_id(0)  # fastest: the M tiles of one weight tile run together (L2 reuse)
    pid_n = tl.program_id(1)
    first = tl.program_id(2) * STEPS_PER_SPLIT  # this split's chunks
    last = tl.minimum(first + STEPS_PER_SPLIT, KW // PLANE)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, PLANE)
    mask_m = offs_m < M
    mask_n = offs_n < N
    w_tile = w_ptr + offs_n[None, :].to(tl.int64) * KW + offs_j[:, None]  # [PLANE, BLOCK_N]
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm  # [BLOCK_M, 1]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for c in range(first, last):  # pairs of planes (p, p + 4) unpacked by one mask, a dot accumulator a group
        words = tl.load(w_tile + c * PLANE, mask=mask_n[None, :], other=0)
        acc_lo = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_hi = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        xs_lo = tl.zeros([BLOCK_M], dtype=tl.float32)
        xs_hi = tl.zeros([BLOCK_M], dtype=tl.float32)
        for p in tl.static_range(4):
            t = ((words >> (4 * p)) & 0x000F000F) | MAGIC
            lo = t.to(tl.int16).to(dtype, bitcast=True)  # plane p
            hi = (t >> 16).to(tl.int16).to(dtype, bitcast=True)  # plane p + 4
            col_lo = c * CHUNK + p * PLANE
            col_hi = col_lo + 4 * PLANE
            x_lo = tl.load(x_rows + (col_lo + offs_j)[None, :],
                           mask=mask_m[:, None] & ((col_lo + offs_j)[None, :] < K), other=0.0)
            x_hi = tl.load(x_rows + (col_hi + offs_j)[None, :],
                           mask=mask_m[:, None] & ((col_hi + offs_j)[None, :] < K), other=0.0)
            if SCALE_EVERY == 8:  # the chunk is inside one group: one accumulator for both halves
                acc_lo = tl.dot(x_lo, lo, acc_lo)
                acc_lo = tl.dot(x_hi, hi, acc_lo)
                xs_lo += tl.sum(x_lo.to(tl.float32), axis=1) + tl.sum(x_hi.to(tl.float32), axis=1)
                if p == 3:
                    acc = _apply_group(acc, acc_lo, xs_lo, s_ptr, m_ptr, ((c * CHUNK) // GROUP) * N,
                                       offs_n, mask_n, OFFSET)
            else:
                if p % SCALE_EVERY == 0:  # a group starts at this plane (and at plane p + 4)
                    acc_lo = tl.dot(x_lo, lo)
                    acc_hi = tl.dot(x_hi, hi)
                    xs_lo = tl.sum(x_lo.to(tl.float32), axis=1)
                    xs_hi = tl.sum(x_hi.to(tl.float32), axis=1)
                else:
                    acc_lo = tl.dot(x_lo, lo, acc_lo)
                    acc_hi = tl.dot(x_hi, hi, acc_hi)
                    xs_lo += tl.sum(x_lo.to(tl.float32), axis=1)
                    xs_hi += tl.sum(x_hi.to(tl.float32), axis=1)
                if p % SCALE_EVERY == SCALE_EVERY - 1:  # the group ends: its scales and mins
                    acc = _apply_group(acc, acc_lo, xs_lo, s_ptr, m_ptr, (col_lo // GROUP) * N,
                                       offs_n, mask_n, OFFSET)
                    acc = _apply_group(acc, acc_hi, xs_hi, s_ptr, m_ptr, (col_hi // GROUP) * N,
                                       offs_n, mask_n, OFFSET)
    store_tile(acc, out_ptr, bias_ptr, offs_m, offs_n, mask_m, mask_n, M, N, stride_om, SPLIT, HAS_BIAS)


def codes_supported(bits: int, plane: int, group_size: int, per_channel: bool, dtype: torch.dtype) -> bool:
    """Which plane weights this kernel takes: INT4 in groups of whole planes (planes inside a group or
    groups of whole chunks), bf16 / fp16 activations; tl.dot needs PLANE >= 16."""
    return (bits == 4 and not per_channel and plane >= 16 and dtype in (torch.bfloat16, torch.float16)
            and scale_every_codes(plane, group_size) > 0)


def scale_every_codes(plane: int, group_size: int) -> int:
    """Planes a group spans inside a chunk of 8 planes (8 = the chunk lies inside one group); 0 when
    groups and planes do not align."""
    if group_size % plane:
        return 0
    planes = group_size // plane
    if planes >= 8:
        return 8 if planes % 8 == 0 else 0
    return planes if 4 % planes == 0 else 0


def codes_gemm(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
               bias: torch.Tensor | None, out: torch.Tensor, *, plane: int, group_size: int,
               k: int, tiles: SplitTiles) -> torch.Tensor:
    """out [M, N] = x [M, K] @ W^T + bias for INT4 plane-layout W (packed.PlaneWeights' tensors), K
    split `tiles.split_k` ways over its chunks."""
    rows, n = out.shape
    every = scale_every_codes(plane, group_size)
    kw = words.shape[1]

    def launch(grid: tuple[int, int, int], dest: torch.Tensor, per: int, split: bool) -> None:
        _codes_gemm_kernel[grid](
            x, words, scales, mins, bias if bias is not None else out, dest, rows, n, k, kw,
            x.stride(0), out.stride(0), per, PLANE=plane, GROUP=group_size, SCALE_EVERY=every,
            BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, HAS_BIAS=bias is not None, SPLIT=split,
            num_warps=tiles.num_warps, num_stages=tiles.num_stages, **pdl_options(x.device),
        )

    return launch_split(launch, kw // plane, out, bias, tiles)

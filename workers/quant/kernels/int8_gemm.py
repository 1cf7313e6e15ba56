"""Tensor-core GEMM on INT8 per-channel plane-layout weights (int8.py's packing), split-K, codes fed raw.

Why: packed.py's `qgemm` ran INT8 at 2-64 rows in 64 x 64 tiles with one pipeline stage (a chunk of
4 x 128 columns holds [128, BLOCK_N] words and four [BLOCK_M, 128] x tiles: 3 stages did not fit),
with N / 64 programs. Here a K step is a block of WORDS = 32 consecutive words of a chunk: words
[32, BLOCK_N] and the four x tiles [BLOCK_M, 32] of the columns they hold (field i of word j of chunk
c is column c * 4 PLANE + i PLANE + j), small enough for 3-4 stages; splitk.py adds K splits.
Weights: w = s (u - 128) + (m + 128 s) per output row n (int8.py stores u = q + 128 and m = -128 s,
so the second term is 0; it is kept exact anyway through the row sums of x). A field u unpacks with
one shift, one and-or into fp32's mantissa (0x4B000000 | u reads 2^23 + u) and one subtraction to
u - 128, exact in bf16 / fp16 (-128..127): tl.dot multiplies x by the codes, and s multiplies the
fp32 accumulator once at the end (no per-weight FMA with the scale). fp32 accumulation; one split
adds the bias and rounds, more write partials that splitk.py's reduce sums, biases and rounds once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from shardserve.parallel.kernels.pdl import pdl_options, release_next, wait_for_previous
from shardserve.workers.quant.kernels.splitk import SplitTiles, launch_split, store_tile

WORDS = 32  # words of a chunk a K step: 4 x 32 columns, 128 bytes of each weight row


@triton.jit(do_not_specialize=["M", "STEPS_PER_SPLIT"])  # one binary for every row count and split
def _int8_gemm_kernel(
    x_ptr, w_ptr, s_ptr, m_ptr, bias_ptr, out_ptr, M, N, K, KW, stride_xm, stride_om, STEPS_PER_SPLIT,
    PLANE: tl.constexpr, WORDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, USE_PDL: tl.constexpr,
):
    """SPLIT: out_ptr is fp32 partials [splits, M, N] (no bias); else out [M, N] in x's dtype."""
    wait_for_previous(USE_PDL)  # parallel/kernels/pdl.py's protocol: nothing read before it
    release_next(USE_PDL)
    CHUNK: tl.constexpr = 4 * PLANE
    BLOCKS: tl.constexpr = PLANE // WORDS  # K steps a chunk
    dtype = x_ptr.dtype.element_ty
    pid_m = tl.program_id(0)  # fastest: the M tiles of one weight tile run together (L2 reuse)
    pid_n = tl.program_id(1)
    first = tl.program_id(2) * STEPS_PER_SPLIT  # this split's K steps
    last = tl.minimum(first + STEPS_PER_SPLIT, KW // WORDS)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, WORDS)
    mask_m = offs_m < M
    mask_n = offs_n < N
    w_tile = w_ptr + offs_n[None, :].to(tl.int64) * KW + offs_j[:, None]  # [WORDS, BLOCK_N]
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm  # [BLOCK_M, 1]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    xacc = tl.zeros([BLOCK_M, WORDS], dtype=tl.float32)  # x summed elementwise; one row sum at the end
    for t in range(first, last):
        words = tl.load(w_tile + t * WORDS, mask=mask_n[None, :], other=0)
        col0 = (t // BLOCKS) * CHUNK + (t % BLOCKS) * WORDS  # the columns of field 0 of these words
        for i in tl.static_range(4):
            cols = col0 + i * PLANE + offs_j
            xv = tl.load(x_rows + cols[None, :], mask=mask_m[:, None] & (cols[None, :] < K), other=0.0)
            q = (((words >> (8 * i)) & 0xFF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0  # u - 128
            acc = tl.dot(xv, q.to(dtype), acc)
            xacc += xv.to(tl.float32)
    s = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32) + 128.0 * s
    acc = acc * s[None, :] + tl.sum(xacc, axis=1)[:, None] * m[None, :]
    store_tile(acc, out_ptr, bias_ptr, offs_m, offs_n, mask_m, mask_n, M, N, stride_om, SPLIT, HAS_BIAS)


def int8_gemm_supported(bits: int, plane: int, per_channel: bool, dtype: torch.dtype) -> bool:
    """INT8, one scale and min a row, planes of whole K steps, bf16 / fp16 activations."""
    return (bits == 8 and per_channel and plane % WORDS == 0
            and dtype in (torch.bfloat16, torch.float16))


def int8_gemm(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
              bias: torch.Tensor | None, out: torch.Tensor, *, plane: int, k: int,
              tiles: SplitTiles) -> torch.Tensor:
    """out [M, N] = x [M, K] @ W^T + bias for INT8 per-channel plane-layout W (packed.PlaneWeights'
    tensors: scales / mins [1, N]), K split `tiles.split_k` ways over its word blocks."""
    rows, n = out.shape
    kw = words.shape[1]

    def launch(grid: tuple[int, int, int], dest: torch.Tensor, per: int, split: bool) -> None:
        _int8_gemm_kernel[grid](
            x, words, scales, mins, bias if bias is not None else out, dest, rows, n, k, kw,
            x.stride(0), out.stride(0), per, PLANE=plane, WORDS=WORDS, BLOCK_M=tiles.block_m,
            BLOCK_N=tiles.block_n, HAS_BIAS=bias is not None, SPLIT=split,
            num_warps=tiles.num_warps, num_stages=tiles.num_stages, **pdl_options(x.device),
        )

    return launch_split(launch, kw // WORDS, out, bias, tiles)

"""The bit-plane layout and its Triton kernels: INT4 weight-only linears, GGUF k-quants, quantized experts.

Layout ("planes"): unsigned codes u (4 or 8 bits; Q6_K and 8-bit experts) are packed PLANES = 32 / BITS to
an int32 word. A row of W [N, K] is cut into chunks of PLANES * PLANE columns held by PLANE consecutive
words; word j of a chunk holds, in its bit field i, the column `chunk * PLANES * PLANE + i * PLANE + j`.
So one contiguous [rows, PLANE] tile of words unpacks with a shift and a mask into PLANES [rows, PLANE]
tiles of *consecutive* columns: every byte streamed once, coalesced; a plane lies inside one group
(PLANE divides the group size). Scales and mins are stored [groups, N] in the activation dtype, or float32
for exact layouts (kquant.py). K is padded to whole chunks (codes, scales, mins 0: padded columns add nothing).

Dequantization without int->float conversions: a field moved to the top mantissa bits of 1.0f reads as
f = 1 + u / 2^BITS, and w = u * s + m = f * (2^BITS * s) + (m - 2^BITS * s): one FMA per weight, in fp32.

`qgemv` (decode, M rows <= GEMV_MAX_ROWS): program (row, tile) streams BLOCK_N rows of words over K, U
chunks an iteration, the next chunk's words loaded before this one is unpacked (the first before the
PDL wait: weights are never written while serving, as in parallel/kernels/decode_linear.py); per group
it sums f x and x (one FMA a weight) and adds s' sum f x + m' sum x once. More rows: w4a16.py (INT4 batches),
the split-K GEMMs (codes_gemm.py, splitk.py) or, for layouts they do not take, `qgemm`: tiles
[BLOCK_M, BLOCK_N], planes dequantized in the main loop and fed to tl.dot. All: fp32 accumulation, one
rounding. `dequantize_planes` writes W in the activation dtype for cuBLAS at prefill sizes; `plane_linear` picks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from shardserve.parallel.kernels.pdl import pdl_options, release_next, wait_for_previous
from shardserve.workers.quant.kernels import w4a16
from shardserve.workers.quant.kernels.codes_gemm import codes_gemm, codes_supported
from shardserve.workers.quant.kernels.splitk import (
    INTERPRETER_SPLIT,
    SplitTiles,
    default_split_tiles,
    sm_count_of,
)

GEMV_MAX_ROWS = 1  # rows up to which the matrix-vector kernel is the default: it re-reads the weights for
# every row, and on an H100 4 rows cost it ~3.5x one row while the GEMMs stay near one read (benchmarks/README.md)
# From this many rows W is dequantized to the activation dtype and cuBLAS multiplies; below it the
# split-K GEMMs (codes_gemm.py for INT4 planes, int8_gemm.py for INT8 codes). 256: the first row count of
# the H100 sweep (`quant_kernels.py --sweep-splitk`, benchmarks/README.md) where dequantize + cuBLAS won,
# for both. plane_linear and int8.int8_linear take it as a parameter.
DEQUANT_MIN_ROWS = 256


@dataclass(frozen=True)
class GemvTiles:
    block_n: int  # output features per program
    chunks: int  # chunks (PLANES * PLANE columns each) per iteration
    num_warps: int


@dataclass(frozen=True)
class GemmTiles:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    chunk_dot: bool = False  # one tl.dot a chunk (planes unpacked side by side) instead of one a plane


@dataclass(frozen=True)
class PlaneWeights:
    """W in the plane layout; what the kernels read (see the module docstring)."""

    words: torch.Tensor  # int32 [N, K_padded / PLANES]
    scales: torch.Tensor  # [groups_padded, N], the activation dtype
    mins: torch.Tensor  # [groups_padded, N]
    bits: int
    plane: int  # PLANE: words per chunk = columns per plane
    group_size: int  # columns per scale (K_padded: one group a row)
    k: int  # input features before padding

    @property
    def n(self) -> int:
        return self.words.shape[0]

    @property
    def per_channel(self) -> bool:
        return self.scales.shape[0] == 1


def pack_planes(u: torch.Tensor, bits: int, plane: int) -> torch.Tensor:
    """Codes u (uint8 [N, K] < 2^bits) -> int32 words [N, K_padded / PLANES] in the plane layout."""
    planes = 32 // bits
    n, k = u.shape
    chunk = planes * plane
    k_pad = -(-k // chunk) * chunk
    codes = torch.zeros(n, k_pad, dtype=torch.int64, device=u.device)
    codes[:, :k] = u.to(torch.int64)
    codes = codes.view(n, k_pad // chunk, planes, plane)  # [N, chunk, field i, word j]
    shifts = (torch.arange(planes, device=u.device, dtype=torch.int64) * bits).view(1, 1, planes, 1)
    words = (codes << shifts).sum(dim=2)  # fields do not overlap: sum == or
    words = torch.where(words >= 2**31, words - 2**32, words)  # two's complement int32
    return words.view(n, -1).to(torch.int32).contiguous()


def pad_groups(t: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """[N, G] float -> [groups, N] in dtype, zero rows past G."""
    out = torch.zeros(groups, t.shape[0], dtype=dtype, device=t.device)
    out[: t.shape[1]] = t.t().to(dtype)
    return out.contiguous()


@triton.jit
def _unpack(words, i: tl.constexpr, BITS: tl.constexpr):
    """Field i of each word as f = 1 + u / 2^BITS (fp32): the field moved to the top mantissa bits of 1.0."""
    shift: tl.constexpr = (23 - BITS) - BITS * i
    if shift >= 0:
        t = words << shift
    else:
        t = words >> (-shift)
    mask: tl.constexpr = ((1 << BITS) - 1) << (23 - BITS)
    return ((t & mask) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _gemv_rows(words, w_rows, x_row, s_ptr, m_ptr, n3, mask_n3, offs_n, mask_n, N, K, KW,
               BITS: tl.constexpr, PLANE: tl.constexpr, GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr,
               SCALE_EVERY: tl.constexpr, U: tl.constexpr, BLOCK_N: tl.constexpr):
    """sum_k x_k w_nk [BLOCK_N] in fp32 for the rows w_rows (scale rows n3 / offs_n of N); `words` holds
    their first U chunks, already loaded."""
    PLANES: tl.constexpr = 32 // BITS
    CHUNK: tl.constexpr = PLANES * PLANE
    SCALE: tl.constexpr = 1 << BITS
    u3 = tl.arange(0, U)[None, :, None]
    j3 = tl.arange(0, PLANE)[None, None, :]
    n_chunks = KW // PLANE
    acc = tl.zeros([BLOCK_N, U, PLANE], dtype=tl.float32)
    xsum = tl.zeros([1, U, PLANE], dtype=tl.float32)
    for c0 in range(0, n_chunks, U):
        cur = words
        c3 = c0 + u3  # [1, U, 1]
        mask_c = c3 < n_chunks
        nxt = c3 + U
        words = tl.load(w_rows + nxt * PLANE, mask=mask_n3 & (nxt < n_chunks), other=0)
        s = tl.zeros([BLOCK_N, U, 1], dtype=tl.float32)
        m = tl.zeros([BLOCK_N, U, 1], dtype=tl.float32)
        acc_g = tl.zeros([BLOCK_N, U, PLANE], dtype=tl.float32)  # sum f x over the group's planes so far
        xsum_g = tl.zeros([1, U, PLANE], dtype=tl.float32)  # sum x over them
        for i in tl.static_range(PLANES):
            col0 = c3 * CHUNK + i * PLANE  # [1, U, 1]: the plane's first column
            cols = col0 + j3
            xv = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)  # [1, U, PLANE]
            f = _unpack(cur, i, BITS)
            if PER_CHANNEL:  # scales applied once at the end: sum f x and sum x
                acc += f * xv
                xsum += xv
            else:  # a group's planes: sum f x and sum x, then once a group acc += s' sum f x + m' sum x
                if i % SCALE_EVERY == 0:  # this plane starts a group: its scales and mins
                    g = (col0 // GROUP) * N
                    s = tl.load(s_ptr + g + n3, mask=mask_n3 & mask_c, other=0.0).to(tl.float32) * SCALE
                    m = tl.load(m_ptr + g + n3, mask=mask_n3 & mask_c, other=0.0).to(tl.float32) - s
                    acc_g = f * xv
                    xsum_g = xv
                else:
                    acc_g += f * xv
                    xsum_g += xv
                if i % SCALE_EVERY == SCALE_EVERY - 1:
                    acc += acc_g * s + xsum_g * m

    y = tl.sum(tl.sum(acc, axis=2), axis=1)  # [BLOCK_N]
    if PER_CHANNEL:  # w = u s + m per row: sum (f * 2^BITS s + m - 2^BITS s) x
        s = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32) * SCALE
        m = tl.load(m_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32) - s
        y = y * s + m * tl.sum(tl.sum(xsum, axis=2), axis=1)
    return y


@triton.jit
def _qgemv_kernel(
    x_ptr, w_ptr, s_ptr, m_ptr, bias_ptr, out_ptr, N_OUT, N, K, KW, stride_xm, stride_om,
    BITS: tl.constexpr, PLANE: tl.constexpr, GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr,
    SCALE_EVERY: tl.constexpr, U: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
    SILU_MUL: tl.constexpr, USE_PDL: tl.constexpr,
):
    """out[row, n] for n < N_OUT; with SILU_MUL, W is [gate; up] (N = 2 N_OUT) and the program's gate
    rows n and up rows N_OUT + n give silu(gate) * up, each rounded as an unfused projection would."""
    row = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N_OUT
    n3 = offs_n[:, None, None]
    mask_n3 = mask_n[:, None, None]
    u3 = tl.arange(0, U)[None, :, None]
    j3 = tl.arange(0, PLANE)[None, None, :]
    n_chunks = KW // PLANE
    w_rows = w_ptr + n3.to(tl.int64) * KW + j3  # [BLOCK_N, 1, PLANE]
    up_rows = w_rows + N_OUT.to(tl.int64) * KW
    # Weights only: read before waiting on the previous kernel (see the module docstring).
    words = tl.load(w_rows + u3 * PLANE, mask=mask_n3 & (u3 < n_chunks), other=0)
    words_up = words
    if SILU_MUL:
        words_up = tl.load(up_rows + u3 * PLANE, mask=mask_n3 & (u3 < n_chunks), other=0)
    wait_for_previous(USE_PDL)
    release_next(USE_PDL)

    x_row = x_ptr + row * stride_xm
    y = _gemv_rows(words, w_rows, x_row, s_ptr, m_ptr, n3, mask_n3, offs_n, mask_n, N, K, KW,
                   BITS, PLANE, GROUP, PER_CHANNEL, SCALE_EVERY, U, BLOCK_N)
    dtype = out_ptr.dtype.element_ty
    if SILU_MUL:
        y_up = _gemv_rows(words_up, up_rows, x_row, s_ptr, m_ptr, n3 + N_OUT, mask_n3, offs_n + N_OUT, mask_n,
                          N, K, KW, BITS, PLANE, GROUP, PER_CHANNEL, SCALE_EVERY, U, BLOCK_N)
        gate = y.to(dtype).to(tl.float32)
        up = y_up.to(dtype).to(tl.float32)
        y = gate / (1.0 + tl.exp(-gate)) * up
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_om + offs_n, y.to(dtype), mask=mask_n)


@triton.jit
def _qgemm_kernel(
    x_ptr, w_ptr, s_ptr, m_ptr, bias_ptr, out_ptr, M, N, K, KW, stride_xm, stride_om,
    BITS: tl.constexpr, PLANE: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK_DOT: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    PLANES: tl.constexpr = 32 // BITS
    CHUNK: tl.constexpr = PLANES * PLANE
    SCALE: tl.constexpr = 1 << BITS
    dtype = out_ptr.dtype.element_ty
    pid_m = tl.program_id(0)  # fastest: the M tiles of one weight tile run together (L2 reuse)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, PLANE)
    mask_m = offs_m < M
    mask_n = offs_n < N
    w_tile = w_ptr + offs_n[None, :].to(tl.int64) * KW + offs_j[:, None]  # [PLANE, BLOCK_N]
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm  # [BLOCK_M, 1]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for c in range(0, KW // PLANE):
        words = tl.load(w_tile + c * PLANE, mask=mask_n[None, :], other=0)
        if CHUNK_DOT:  # the chunk's planes unpacked side by side: one dot with K = CHUNK
            i3 = tl.arange(0, PLANES)[:, None, None]
            u = (words[None, :, :] >> (i3 * BITS)) & ((1 << BITS) - 1)  # [PLANES, PLANE, BLOCK_N]
            g3 = ((c * CHUNK + i3 * PLANE) // GROUP) * N
            s3 = tl.load(s_ptr + g3 + offs_n[None, None, :], mask=mask_n[None, None, :], other=0.0)
            m3 = tl.load(m_ptr + g3 + offs_n[None, None, :], mask=mask_n[None, None, :], other=0.0)
            w = tl.reshape(u.to(tl.float32) * s3.to(tl.float32) + m3.to(tl.float32), [CHUNK, BLOCK_N])
            cols = c * CHUNK + tl.arange(0, CHUNK)
            xv = tl.load(x_rows + cols[None, :], mask=mask_m[:, None] & (cols[None, :] < K), other=0.0)
            acc = tl.dot(xv, w.to(dtype), acc)
        else:
            for i in tl.static_range(PLANES):
                col0 = c * CHUNK + i * PLANE
                g = (col0 // GROUP) * N
                s = tl.load(s_ptr + g + offs_n, mask=mask_n, other=0.0).to(tl.float32) * SCALE
                m = tl.load(m_ptr + g + offs_n, mask=mask_n, other=0.0).to(tl.float32) - s
                w = (_unpack(words, i, BITS) * s[None, :] + m[None, :]).to(dtype)  # [PLANE, BLOCK_N]
                cols = col0 + offs_j
                xv = tl.load(x_rows + cols[None, :], mask=mask_m[:, None] & (cols[None, :] < K), other=0.0)
                acc = tl.dot(xv, w, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out, acc.to(dtype), mask=mask_m[:, None] & mask_n[None, :])


def scale_every(w: PlaneWeights) -> int:
    """Planes between scale loads in the GEMV: one load a group when groups and chunks (both powers of
    two) align, else every plane."""
    chunk = (32 // w.bits) * w.plane
    g = w.group_size
    if g & (g - 1):
        return 1
    return max(1, min(g, chunk) // w.plane)


def default_gemv_tiles(w: PlaneWeights, rows: int) -> GemvTiles:
    """1 KiB of words a row an iteration, 4 rows a program, 4 warps: the best or within a few % of it at
    every Llama-3.1-8B shape in benchmarks/quant_kernels.py --sweep on an H100 (INT8 planes then; INT4 planes 16-128)."""
    return GemvTiles(block_n=4, chunks=max(1, 256 // w.plane), num_warps=4)


def default_gemm_tiles(w: PlaneWeights, rows: int) -> GemmTiles:
    """Small M: 16 x 32 tiles (every SM streams weights), 3 stages: the sweep's best at M = 16;
    more rows: 64 x 64 tiles, one stage (one tl.dot a plane: 8 x-tiles a chunk would not fit 3 stages)."""
    if rows <= 16:
        return GemmTiles(16, 32, 4, 3)
    return GemmTiles(64, 64, 4, 1)


INTERPRETER_GEMV = GemvTiles(16, 2, 4)  # under Triton's interpreter: several programs and iterations
INTERPRETER_GEMM = GemmTiles(16, 32, 4, 1)


def split_supported(w: PlaneWeights, dtype: torch.dtype) -> bool:
    """Whether the split-K GEMM (codes_gemm.py) takes these weights: INT4 in groups of whole planes."""
    return codes_supported(w.bits, w.plane, w.group_size, w.per_channel, dtype)


def split_gemm(x: torch.Tensor, w: PlaneWeights, bias: torch.Tensor | None, out: torch.Tensor,
               tiles: SplitTiles) -> torch.Tensor:
    """out = x @ W^T + bias by codes_gemm.py (the caller checked `split_supported`)."""
    return codes_gemm(x, w.words, w.scales, w.mins, bias, out, plane=w.plane, group_size=w.group_size,
                      k=w.k, tiles=tiles)


def check_input(x: torch.Tensor, k: int, bias: torch.Tensor | None, n: int) -> None:
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [M, {k}], got {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"x must be bfloat16 or float16, got {x.dtype}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")


def plane_linear(x: torch.Tensor, w: PlaneWeights, bias: torch.Tensor | None = None,
                 gemv_tiles: GemvTiles | None = None, gemm_tiles: GemmTiles | None = None,
                 split_tiles: SplitTiles | None = None, silu_mul: bool = False,
                 dequant_min_rows: int | None = None, w4_tiles: w4a16.W4Tiles | None = None) -> torch.Tensor:
    """x [M, K] (bf16/fp16, already permuted for act-order) -> x @ W^T + bias [M, N] in x's dtype.

    Up to GEMV_MAX_ROWS rows (or any rows with `gemv_tiles`) the matrix-vector kernel; then, below
    `dequant_min_rows` rows: INT4 with scales in x's dtype from w4a16.MIN_ROWS rows w4a16.py's GEMM
    (w4a16.default_tiles), below that (and INT4 in exact float32 layouts) the split-K GEMM (codes_gemm.py
    for INT4 in groups of whole planes; splitk.default_split_tiles) or, for other layouts, this module's
    dequantizing GEMM; from `dequant_min_rows` rows on CUDA (default: where w4a16.py takes the weights,
    `w4a16.dequant_wins`, its tile table's verdict; else DEQUANT_MIN_ROWS), W dequantized + cuBLAS. `gemm_tiles` /
    `split_tiles` / `w4_tiles` force one GEMM at any M. `silu_mul` (W = [gate; up], no bias, at most
    GEMV_MAX_ROWS rows): silu(gate) * up [M, N / 2] from the GEMV's epilogue."""
    check_input(x, w.k, bias, w.n)
    if x.stride(1) != 1:
        x = x.contiguous()
    rows, n = x.shape[0], w.n
    gemv = rows <= GEMV_MAX_ROWS or gemv_tiles is not None
    if silu_mul and (not gemv or bias is not None or n % 2):
        raise ValueError(f"silu_mul takes at most {GEMV_MAX_ROWS} rows, no bias and an even N; got {rows} rows, N {n}")
    if w.scales.dtype not in (x.dtype, torch.float32):  # float32: exact layouts (GGUF k-quants, kquant.py)
        raise ValueError(f"weights were packed for {w.scales.dtype}, x is {x.dtype}")
    interpreted = x.device.type != "cuda"
    forced = gemv_tiles is not None or gemm_tiles is not None or split_tiles is not None or w4_tiles is not None
    w4_ok = w4a16.supported(w.bits, w.plane, w.scales.dtype, x.dtype)
    if dequant_min_rows is not None:
        dequant = rows >= dequant_min_rows
    else:
        dequant = w4a16.dequant_wins(rows, n, w.k) if w4_ok else rows >= DEQUANT_MIN_ROWS
    if dequant and not interpreted and not forced and n:
        return torch.nn.functional.linear(x, dequantize_planes(w, x.dtype), bias)
    n_out = n // 2 if silu_mul else n
    out = torch.empty(rows, n_out, dtype=x.dtype, device=x.device)
    if rows == 0 or n == 0:
        return out
    bias_arg = bias if bias is not None else out
    kw = w.words.shape[1]
    if not silu_mul and (w4_tiles is not None or (w4_ok and not forced and rows >= w4a16.MIN_ROWS)):
        if not w4_ok:
            raise ValueError(f"the W4A16 GEMM takes INT4 planes of 16-64 columns with scales in x's dtype; got "
                             f"{w.bits}-bit planes of {w.plane}, scales {w.scales.dtype}, x {x.dtype}")
        t = w4_tiles or (w4a16.INTERPRETER_TILES if interpreted
                         else w4a16.default_tiles(rows, n, w.k, sm_count_of(x.device)))
        return w4a16.w4a16_gemm(x, w.words, w.scales, w.mins, bias, out, plane=w.plane, group_size=w.group_size,
                                k=w.k, tiles=t)
    split_ok = split_supported(w, x.dtype)
    if not silu_mul and (split_tiles is not None or (split_ok and gemm_tiles is None and not gemv)):
        if not split_ok:
            raise ValueError(f"the split-K GEMM takes INT4 in groups of whole planes; got "
                             f"{w.bits}-bit planes of {w.plane} in groups of {w.group_size}")
        t = split_tiles or (INTERPRETER_SPLIT if interpreted
                            else default_split_tiles(w.bits, rows, n, w.k, sm_count_of(x.device)))
        return split_gemm(x, w, bias, out, t)
    if gemv:
        t = gemv_tiles or (INTERPRETER_GEMV if interpreted else default_gemv_tiles(w, rows))
        _qgemv_kernel[(rows, triton.cdiv(n_out, t.block_n))](
            x, w.words, w.scales, w.mins, bias_arg, out, n_out, n, w.k, kw, x.stride(0), out.stride(0),
            BITS=w.bits, PLANE=w.plane, GROUP=w.group_size, PER_CHANNEL=w.per_channel,
            SCALE_EVERY=scale_every(w), U=t.chunks, BLOCK_N=t.block_n, HAS_BIAS=bias is not None,
            SILU_MUL=silu_mul, num_warps=t.num_warps, **pdl_options(x.device),
        )
        return out
    t = gemm_tiles or (INTERPRETER_GEMM if interpreted else default_gemm_tiles(w, rows))
    _qgemm_kernel[(triton.cdiv(rows, t.block_m), triton.cdiv(n, t.block_n))](
        x, w.words, w.scales, w.mins, bias_arg, out, rows, n, w.k, kw, x.stride(0), out.stride(0),
        BITS=w.bits, PLANE=w.plane, GROUP=w.group_size, BLOCK_M=t.block_m, BLOCK_N=t.block_n,
        CHUNK_DOT=t.chunk_dot, HAS_BIAS=bias is not None, num_warps=t.num_warps, num_stages=t.num_stages,
    )
    return out


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, m_ptr, out_ptr, N, K, KW, BITS: tl.constexpr, PLANE: tl.constexpr,
                    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, EXACT: tl.constexpr = False):
    """out[n, k] = u s + m (the activation dtype) for one chunk of BLOCK_N rows: each packed byte read once.
    EXACT (float32 scales): u recovered as an integer and u * s + m rounded once, so float32 output is
    the checkpoint's own dequantization (GGUF k-quants), where f * 2^BITS s + (m - 2^BITS s) may round twice."""
    PLANES: tl.constexpr = 32 // BITS
    CHUNK: tl.constexpr = PLANES * PLANE
    SCALE: tl.constexpr = 1 << BITS
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    c = tl.program_id(1)
    offs_j = tl.arange(0, PLANE)
    mask_n = offs_n < N
    words = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * KW + c * PLANE + offs_j[None, :], mask=mask_n[:, None],
                    other=0)
    dtype = out_ptr.dtype.element_ty
    for i in tl.static_range(PLANES):
        col0 = c * CHUNK + i * PLANE
        g = (col0 // GROUP) * N
        if EXACT:
            s = tl.load(s_ptr + g + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            m = tl.load(m_ptr + g + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            w = ((_unpack(words, i, BITS) - 1.0) * SCALE) * s[:, None] + m[:, None]
        else:
            s = tl.load(s_ptr + g + offs_n, mask=mask_n, other=0.0).to(tl.float32) * SCALE
            m = tl.load(m_ptr + g + offs_n, mask=mask_n, other=0.0).to(tl.float32) - s
            w = _unpack(words, i, BITS) * s[:, None] + m[:, None]
        cols = col0 + offs_j
        tl.store(out_ptr + offs_n[:, None].to(tl.int64) * K + cols[None, :], w.to(dtype),
                 mask=mask_n[:, None] & (cols[None, :] < K))


def dequantize_planes(w: PlaneWeights, dtype: torch.dtype) -> torch.Tensor:
    """W [N, K] in `dtype` from the plane layout (for cuBLAS at prefill sizes: DEQUANT_MIN_ROWS)."""
    out = torch.empty(w.n, w.k, dtype=dtype, device=w.words.device)
    block_n = 16 if w.words.device.type != "cuda" else 32
    _dequant_kernel[(triton.cdiv(w.n, block_n), w.words.shape[1] // w.plane)](
        w.words, w.scales, w.mins, out, w.n, w.k, w.words.shape[1], BITS=w.bits, PLANE=w.plane,
        GROUP=w.group_size, BLOCK_N=block_n, EXACT=w.scales.dtype == torch.float32, num_warps=4,
    )
    return out

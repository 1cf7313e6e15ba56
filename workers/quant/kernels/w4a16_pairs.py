"""W4A16 GEMM variant of w4a16.py that dequantizes two weights an instruction (bf16x2 / f16x2), for 128+ rows.

Why: past ~128 rows w4a16.py is bound by its per-weight dequantization (shift, and-or, fp32 FMA, a
conversion: ~4.5 instructions a weight, between wgmmas). A plane-layout word holds column j of each of
its chunk's 8 planes, so one shift and one and-or put planes d and d + 4 (bits 4d and 4d + 16) into the two
halves of a register as 128 + u (bf16 0x4300 | u; fp16 1024 + u, 0x6400 | u): one packed subtract gives
u exactly and one packed FMA u * s + m, each half with its own group's scale and min. That register is a
wgmma A-operand pair (K columns 2j, 2j + 1), so a dot's K order interleaves planes d and d + 4; x is gathered
once a call into that order (`pair_order`, an index_select; K in whole chunks), making each dot's x tile
2 PLANE contiguous columns. Program (m tile, n tile, K split) as w4a16.py (swapped only: W the register
operand): words loaded once a chunk, 4 dots of K = 2 PLANE (scales a chunk ahead), fp32 accumulation.
Under Triton's interpreter (no inline PTX) the same tile is built in fp32 from the same words.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from shardserve.parallel.kernels.pdl import pdl_options, release_next, wait_for_previous
from shardserve.workers.quant.kernels.splitk import store_tile


@triton.jit
def _pairs(t, s2, m2, dtype: tl.constexpr, ASM: tl.constexpr):
    """t int32 [BN, 2P]: each word twice (element 2j + h: field h at bits 16 h of word j); s2 / m2 [BN, 2P] in
    x's dtype (half h: its plane's group) -> the weights u s + m in x's dtype."""
    if ASM:
        if dtype == tl.bfloat16:
            w = tl.inline_asm_elementwise(
                "{ .reg .b32 v, c; lop3.b32 v, $1, 0x000F000F, 0x43004300, 0xea; mov.b32 c, 0x43004300;"
                " sub.rn.bf16x2 v, v, c; fma.rn.bf16x2 $0, v, $3, $4; }",
                "=r,r,r,r,r", [t, s2, m2], dtype=tl.bfloat16, is_pure=True, pack=2)
        else:
            w = tl.inline_asm_elementwise(
                "{ .reg .b32 v, c; lop3.b32 v, $1, 0x000F000F, 0x64006400, 0xea; mov.b32 c, 0x64006400;"
                " sub.rn.f16x2 v, v, c; fma.rn.f16x2 $0, v, $3, $4; }",
                "=r,r,r,r,r", [t, s2, m2], dtype=tl.float16, is_pure=True, pack=2)
    else:
        half = (tl.arange(0, t.shape[1]) % 2)[None, :]
        u = ((t >> (16 * half)) & 0xF).to(tl.float32)
        w = (u * s2.to(tl.float32) + m2.to(tl.float32)).to(dtype)
    return w


@triton.jit
def _both(lo, hi, BLOCK_N: tl.constexpr, PLANE: tl.constexpr):
    """[BLOCK_N] lo / hi -> [BLOCK_N, 2 PLANE]: lo at even columns, hi at odd."""
    a = tl.broadcast_to(lo[:, None], [BLOCK_N, PLANE])
    b = tl.broadcast_to(hi[:, None], [BLOCK_N, PLANE])
    return tl.reshape(tl.join(a, b), [BLOCK_N, 2 * PLANE])


@triton.jit
def _chunk_scales(s_ptr, m_ptr, c, last, n64, mask_n, N, CHUNK: tl.constexpr, GROUP: tl.constexpr):
    """Scales and mins [BLOCK_N] of chunk c's planes 0-3 (lo) and 4-7 (hi); zeros from chunk `last` on."""
    g_lo = ((c * CHUNK) // GROUP) * N
    g_hi = ((c * CHUNK + CHUNK // 2) // GROUP) * N
    mask = mask_n & ((n64 * 0 + c) < last)
    return (tl.load(s_ptr + g_lo + n64, mask=mask, other=0.0), tl.load(s_ptr + g_hi + n64, mask=mask, other=0.0),
            tl.load(m_ptr + g_lo + n64, mask=mask, other=0.0), tl.load(m_ptr + g_hi + n64, mask=mask, other=0.0))


@triton.jit(do_not_specialize=["M", "STEPS_PER_SPLIT"])
def _w4a16_pairs_kernel(
    x_ptr, w_ptr, s_ptr, m_ptr, bias_ptr, out_ptr, M, N, KW, stride_xm, stride_om, STEPS_PER_SPLIT,
    PLANE: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, ASM: tl.constexpr, USE_PDL: tl.constexpr,
):
    """x_ptr: x gathered by `pair_order` [M, K] (K whole chunks). SPLIT: out_ptr is fp32 partials [splits, M, N]."""
    wait_for_previous(USE_PDL)  # parallel/kernels/pdl.py's protocol: nothing read before it
    release_next(USE_PDL)
    CHUNK: tl.constexpr = 8 * PLANE
    dtype = x_ptr.dtype.element_ty
    pid_m = tl.program_id(0)  # fastest: the m tiles of one weight tile run together (L2)
    pid_n = tl.program_id(1)
    first = tl.program_id(2) * STEPS_PER_SPLIT
    last = tl.minimum(first + STEPS_PER_SPLIT, KW // PLANE)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    n64 = offs_n.to(tl.int64)
    w_tile = w_ptr + n64[:, None] * KW + tl.arange(0, PLANE)[None, :]  # [BLOCK_N, PLANE] words
    x_tile = x_ptr + offs_m.to(tl.int64)[None, :] * stride_xm + tl.arange(0, 2 * PLANE)[:, None]  # [2P, BLOCK_M]
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    # groups of >= 4 whole planes: planes 0-3 of a chunk share a group, so do 4-7; their scales and mins are
    # loaded a chunk ahead (the load's latency behind this chunk's dots), else each dot loads its own
    AHEAD: tl.constexpr = GROUP % (4 * PLANE) == 0
    if AHEAD:
        s_lo, s_hi, m_lo, m_hi = _chunk_scales(s_ptr, m_ptr, first, last, n64, mask_n, N, CHUNK, GROUP)
    for c in range(first, last):
        words = tl.load(w_tile + c * PLANE, mask=mask_n[:, None], other=0)
        if AHEAD:
            s2 = _both(s_lo, s_hi, BLOCK_N, PLANE)
            m2 = _both(m_lo, m_hi, BLOCK_N, PLANE)
            s_lo, s_hi, m_lo, m_hi = _chunk_scales(s_ptr, m_ptr, c + 1, last, n64, mask_n, N, CHUNK, GROUP)
        for d in tl.static_range(4):  # planes d and d + 4: one dot of 2 PLANE columns
            ws = words >> (4 * d)
            t = tl.reshape(tl.join(ws, ws), [BLOCK_N, 2 * PLANE])
            if not AHEAD:
                g_lo = ((c * CHUNK + d * PLANE) // GROUP) * N
                g_hi = ((c * CHUNK + (d + 4) * PLANE) // GROUP) * N
                s2 = _both(tl.load(s_ptr + g_lo + n64, mask=mask_n, other=0.0),
                           tl.load(s_ptr + g_hi + n64, mask=mask_n, other=0.0), BLOCK_N, PLANE)
                m2 = _both(tl.load(m_ptr + g_lo + n64, mask=mask_n, other=0.0),
                           tl.load(m_ptr + g_hi + n64, mask=mask_n, other=0.0), BLOCK_N, PLANE)
            w = _pairs(t, s2, m2, dtype, ASM)
            xv = tl.load(x_tile + (c * CHUNK + d * 2 * PLANE), mask=mask_m[None, :], other=0.0)
            acc = tl.dot(w, xv, acc)
    store_tile(tl.trans(acc), out_ptr, bias_ptr, offs_m, offs_n, mask_m, mask_n, M, N, stride_om, SPLIT, HAS_BIAS)


@functools.cache
def pair_order(k: int, plane: int, device: torch.device) -> torch.Tensor:
    """Column order of the gathered x: within each chunk, dot d's 2 PLANE columns alternate plane d's column j
    and plane d + 4's (chunk-local (d + 4 h) PLANE + j at 2 PLANE d + 2 j + h)."""
    chunk = 8 * plane
    if k % chunk:
        raise ValueError(f"the paired W4A16 GEMM takes K in whole chunks of {chunk} columns, got {k}")
    r = torch.arange(chunk)
    d, j, h = r // (2 * plane), (r % (2 * plane)) // 2, r % 2
    local = (d + 4 * h) * plane + j
    return (torch.arange(0, k, chunk)[:, None] + local[None, :]).reshape(-1).to(device)


def launch_pairs(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                 bias: torch.Tensor | None, plane: int, group_size: int, block_m: int, block_n: int,
                 num_warps: int, num_stages: int):
    """x gathered into `pair_order`, and a splitk.Launch running this kernel on it."""
    rows, k = x.shape
    xg = x.index_select(1, pair_order(k, plane, x.device))
    n, kw = words.shape

    def launch(grid: tuple[int, int, int], dest: torch.Tensor, per: int, split: bool) -> None:
        _w4a16_pairs_kernel[grid](
            xg, words, scales, mins, bias if bias is not None else dest, dest, rows, n, kw, xg.stride(0),
            dest.stride(-2), per, PLANE=plane, GROUP=group_size, BLOCK_M=block_m, BLOCK_N=block_n,
            HAS_BIAS=bias is not None, SPLIT=split, ASM=x.device.type == "cuda", num_warps=num_warps,
            num_stages=num_stages, **pdl_options(x.device),
        )

    return launch

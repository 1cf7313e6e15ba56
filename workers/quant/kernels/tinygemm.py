"""INT4 group-wise linear on CUDA through PyTorch's own tensor-core kernel (tinygemm), for bf16 activations.

Why: at decode sizes `torch._weight_int4pack_mm` (the kernel gpt-fast and torchao use) streams INT4
weights faster than this package's Triton GEMV (benchmarks/README.md), and ships inside torch itself.
Data flow: `pack_tiny` turns an `Int4Weight` (codes, scales, mins [N, G]) into torch's packed tensor
(`_convert_weight_to_int4pack`) plus [G, N, 2] (scale, zero) with w = (q - 8) * scale + zero, i.e.
zero = min + 8 scale. `tiny_linear` permutes x for act-order, then: up to TINY_MAX_ROWS rows the
kernel; more rows, W dequantized to bf16 by `_dequant_kernel` and multiplied by cuBLAS (the kernel is
slow at prefill sizes). The engine holds an `Int4Dual`: this packing for up to TINY_MAX_ROWS rows
beside int4.py's plane layout for more (its codes GEMM and dequantize kernel are ~2-3x faster than
this module's dequantize above 16 rows on an H100): INT4 weights then take 1 byte a weight, not 0.5.
torch's packed layout is not documented, so `block_layout` reads it once per
device: it packs an 8 x BK block whose codes spell each element's index (4 bits a pass) and records
which element every nibble of the packed block holds; the layout repeats block by block.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from shardserve.workers.quant.kernels.int4 import Int4Packed, int4_linear, pack_int4
from shardserve.workers.quant.weights import Int4Weight

TINY_MAX_ROWS = 16  # rows up to which torch's kernel runs; above, dequantize + cuBLAS
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
    """x [M, K] bf16 -> x @ W^T + bias [M, N] (W = the Int4Weight's dequantize())."""
    if x.dim() != 2 or x.shape[1] != p.k or x.dtype != torch.bfloat16:
        raise ValueError(f"x must be bfloat16 [M, {p.k}], got {x.dtype} {tuple(x.shape)}")
    if p.perm is not None:
        x = x.index_select(1, p.perm)
    if x.shape[0] > TINY_MAX_ROWS:
        return torch.nn.functional.linear(x, dequantize_tiny(p), bias)
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


@functools.cache
def block_layout(inner_k_tiles: int, device: torch.device) -> torch.Tensor:
    """int32 [8 * BK] (BK = 16 * inner_k_tiles): for element (r, c) of a block, at r * BK + c, the
    nibble of the packed block holding it (word * 8 + nibble, nibble i at bits 4i..4i+3)."""
    bk = 16 * inner_k_tiles
    index = torch.arange(N_TILE * bk, device=device)
    holds = torch.zeros(N_TILE * bk, dtype=torch.int64, device=device)  # nibble position -> element
    for shift in range(0, int(N_TILE * bk - 1).bit_length(), 4):
        codes = ((index >> shift) & 0xF).view(N_TILE, bk).to(torch.uint8)
        words = torch._convert_weight_to_int4pack((codes[:, ::2] << 4 | codes[:, 1::2]).contiguous(), inner_k_tiles)
        nibbles = (words.reshape(-1, 1).to(torch.int64) >> (4 * torch.arange(8, device=device))) & 0xF
        holds |= nibbles.reshape(-1) << shift
    if not torch.equal(holds.sort().values, index):
        raise RuntimeError("torch's int4 packing is not a permutation of one block: unsupported torch version")
    where = torch.empty_like(holds)
    where[holds] = torch.arange(holds.numel(), device=device)
    return where.to(torch.int32)


@triton.jit
def _dequant_kernel(words_ptr, where_ptr, sz_ptr, out_ptr, N, K, K_BLOCKS,
                    BK: tl.constexpr, GROUP: tl.constexpr, TILES: tl.constexpr):
    """W [TILES * 8 rows, BK columns] of block column kb: each element's nibble found through `where`
    (one [8, BK] table for every block); scales and zeros loaded once a row and group."""
    pid_n = tl.program_id(0)
    kb = tl.program_id(1)
    t3 = tl.arange(0, TILES)[:, None, None]
    r3 = tl.arange(0, 8)[None, :, None]
    c3 = tl.arange(0, BK)[None, None, :]
    tile = pid_n * TILES + t3  # [TILES, 1, 1] n-tile
    mask = tile * 8 < N
    pos = tl.load(where_ptr + r3 * BK + c3)  # [1, 8, BK] nibble within a block
    words = tl.load(words_ptr + (tile.to(tl.int64) * K_BLOCKS + kb) * BK + pos // 8, mask=mask, other=0)
    q = ((words >> ((pos % 8) * 4)) & 0xF).to(tl.float32)  # [TILES, 8, BK]
    q = tl.reshape(q, [TILES * 8, BK // GROUP if GROUP < BK else 1, GROUP if GROUP < BK else BK])
    n = pid_n * TILES * 8 + tl.arange(0, TILES * 8)
    g0 = (kb * BK) // GROUP
    gs = g0 + tl.arange(0, BK // GROUP if GROUP < BK else 1)  # the block's groups
    sz = sz_ptr + (gs[None, :, None] * N + n[:, None, None]) * 2  # [TILES * 8, groups, 1]
    row_ok = (n < N)[:, None, None]
    w = (q - 8.0) * tl.load(sz, mask=row_ok, other=0.0).to(tl.float32) + tl.load(sz + 1, mask=row_ok,
                                                                                   other=0.0).to(tl.float32)
    w = tl.reshape(w, [TILES * 8, BK])
    k = kb * BK + tl.arange(0, BK)[None, :]
    out = out_ptr + n[:, None].to(tl.int64) * K + k
    tl.store(out, w.to(out_ptr.dtype.element_ty), mask=(n < N)[:, None])


def dequantize_words(words: torch.Tensor, where: torch.Tensor, scales_zeros: torch.Tensor, n: int, k: int,
                     group_size: int, inner_k_tiles: int, tiles: int = 4) -> torch.Tensor:
    """W [N, K] bf16 from blocks in the layout `where` describes (see `block_layout`)."""
    bk = 16 * inner_k_tiles
    out = torch.empty(n, k, dtype=torch.bfloat16, device=words.device)
    grid = (triton.cdiv(n, tiles * N_TILE), k // bk)
    _dequant_kernel[grid](words, where, scales_zeros, out, n, k, k // bk, BK=bk, GROUP=group_size, TILES=tiles)
    return out


def dequantize_tiny(p: TinyPacked) -> torch.Tensor:
    """W [N, K] bf16 in the packed (act-order) column order."""
    return dequantize_words(p.words, block_layout(p.inner_k_tiles, p.words.device), p.scales_zeros, p.n, p.k,
                            p.group_size, p.inner_k_tiles)

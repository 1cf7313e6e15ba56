"""Fused mixture-of-experts MLP: token alignment + grouped GEMM, CUDA-graph safe.

Data flow of `fused_moe(x [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_weights [T, k], topk_ids [T, k])`
over the E experts this rank holds (global ids `local_expert_start .. + E`):
1. `moe_align_block_size` (moe_align.py; no host sync) sorts the T*k (token, slot) rows by local
   expert, padding each expert's group to a multiple of BLOCK_M; rows routed to other ranks'
   experts (EP) are in no block.
2. `_moe_gemm_kernel` (grid fixed from the padded bound, so a captured graph replays for any
   routing) computes, per M-block of one expert, `C[row] = A[row // a_row_div] @ W[e]^T` in fp32:
   Up:   A = x (a_row_div = k)          -> h [T*k, 2I]
   SiLU-and-mul (activation.py kernel)  -> a [T*k, I]
   Down: A = a (a_row_div = 1), weighted -> y [T*k, H]
   Direct path (`use_direct_rows`, e.g. batch-1..4 decode): no alignment launch; each flat row is
   its own M-block and reads its expert from topk_ids (see `use_direct_rows`).
3. `_moe_sum_kernel` sums each token's k rows of y in fp32 (local experts only), rounds once.
Steps 1-3 are `moe_pipeline`, which takes the two grouped GEMMs as a function: quantized experts
(workers/quant/kernels/moe.py) reuse it with GEMMs that dequantize in their main loop.
Tiles: `moe_tiles` picks them by average rows per expert from `CUDA_TILE_BANDS` (decode BLOCK_M 16,
prefill up to 64; `benchmarks/moe_gpu_check.py --sweep` times candidates). The CPU interpreter uses
small tiles; fp32 operands use `input_precision="ieee"` so fp32 results match torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from shardserve.workers.kernels import moe_align
from shardserve.workers.kernels.activation import silu_and_mul
from shardserve.workers.kernels.moe_align import moe_align_block_size, padded_length  # re-exported

__all__ = ["CUDA_TILE_BANDS", "MoeRows", "MoeTiles", "fit_shared_memory", "fused_moe", "moe_align_block_size",
           "moe_pipeline", "moe_tiles", "padded_length", "use_direct_rows"]


@dataclass(frozen=True)
class MoeTiles:
    block_m: int
    block_n: int
    block_k: int
    group_m: int  # M-blocks per L2 swizzle group
    num_warps: int
    num_stages: int


INTERPRETER_TILES = MoeTiles(16, 32, 32, 1, 4, 1)

# (upper bound of the average rows per local expert T*k / E, tiles), bounds increasing; the first
# band whose bound is >= the batch's rows per expert applies. For Qwen3-30B-A3B (E=128, k=8)
# rows per expert = T / 16. From `moe_gpu_check.py --sweep` on an H100 (2026-11-26, the TP 2
# slice E=128, I=384; gains over the previous three bands 1.0-1.16x, largest at T >= 1024).
CUDA_TILE_BANDS: tuple[tuple[float, MoeTiles], ...] = (
    (0.0625, MoeTiles(16, 64, 128, 1, 4, 4)),  # decode: weight-bandwidth bound, few rows per expert
    (0.5, MoeTiles(16, 64, 128, 1, 4, 2)),
    (2.0, MoeTiles(16, 64, 128, 1, 4, 4)),
    (8.0, MoeTiles(16, 128, 128, 1, 8, 3)),
    (16.0, MoeTiles(32, 64, 128, 1, 4, 3)),
    (32.0, MoeTiles(64, 64, 64, 16, 4, 3)),
    (64.0, MoeTiles(64, 128, 64, 1, 8, 3)),
    (math.inf, MoeTiles(128, 256, 64, 16, 8, 4)),
)


# Operand tiles a program may stage in shared memory: (BLOCK_M x BLOCK_K + BLOCK_K x BLOCK_N) x
# element bytes x stages. The bands are tuned for 2-byte weights (the largest takes 192 KB of an
# H100's 227 KB); fp32 operands would need twice that and fail to compile, so they get fewer stages.
SMEM_BUDGET_BYTES = 200 * 1024


def fit_shared_memory(tiles: MoeTiles, element_size: int) -> MoeTiles:
    """`tiles` with num_stages lowered until its staged operand tiles fit SMEM_BUDGET_BYTES."""
    per_stage = (tiles.block_m * tiles.block_k + tiles.block_k * tiles.block_n) * element_size
    stages = tiles.num_stages
    while stages > 1 and per_stage * stages > SMEM_BUDGET_BYTES:
        stages -= 1
    return tiles if stages == tiles.num_stages else replace(tiles, num_stages=stages)


def moe_tiles(num_rows: int, num_local: int, on_cuda: bool, element_size: int = 2) -> MoeTiles:
    """Tile config for num_rows = T * k (token, slot) rows over num_local experts."""
    if not on_cuda:
        return INTERPRETER_TILES
    per_expert = num_rows / max(num_local, 1)
    tiles = next(tiles for bound, tiles in CUDA_TILE_BANDS if per_expert <= bound)
    return fit_shared_memory(tiles, element_size)


# one compile for every batch size (odd T*k included) and every EP range
@triton.jit(do_not_specialize=["num_rows", "expert_lo", "num_local"])
def _moe_gemm_kernel(
    a_ptr, w_ptr, c_ptr, row_weight_ptr, sorted_ids_ptr, expert_ids_ptr, num_post_ptr,
    num_rows, N, K, a_row_div, expert_lo, num_local,
    stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_cm, stride_cn,
    MUL_ROW_WEIGHT: tl.constexpr, IEEE: tl.constexpr, DIRECT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Swizzle: GROUP_M consecutive M-blocks walk the N-tiles together (A tiles reused from L2).
    """Aligned layout (moe_align.py): `sorted_token_ids [L]` holds flat row ids `t * k + slot` (padding:
    the sentinel T*k), `expert_ids [L / BLOCK_M]` the local expert of each M-block (-1 past the end),
    `num_tokens_post_padded [1]` the used length; L = T*k + min(E, T*k) * (BLOCK_M - 1), rounded up
    to BLOCK_M, bounds the padded length for any routing. Blocks at or past the used length (or with
    expert -1) exit at once; padding rows are masked. Optionally times the row's routing weight.
    """
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_m = tl.num_programs(0) // num_pid_n
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_size
    pid_n = (pid % in_group) // group_size

    if DIRECT:  # M-block pid_m is flat row pid_m alone; sorted_ids_ptr is topk_ids [T*k]
        expert = tl.load(sorted_ids_ptr + pid_m).to(tl.int64) - expert_lo
        if (expert < 0) | (expert >= num_local):
            return  # another EP rank's expert
        first = tl.arange(0, BLOCK_M) == 0
        rows = tl.where(first, pid_m, num_rows).to(tl.int64)
        row_mask = first
    else:
        if pid_m * BLOCK_M >= tl.load(num_post_ptr):
            return  # past the last real block (the grid is sized for the worst routing)
        expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
        if expert < 0:
            return
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = tl.load(sorted_ids_ptr + offs_m).to(tl.int64)  # [M] flat (token, slot) ids
        row_mask = rows < num_rows  # padding rows hold the sentinel num_rows
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (rows // a_row_div)[:, None] * stride_am + offs_k[None, :] * stride_ak  # [M, K]
    w_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk  # [K, N]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = offs_k < K - k0 * BLOCK_K
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    if MUL_ROW_WEIGHT:
        row_weight = tl.load(row_weight_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        acc = acc * row_weight[:, None]
    c_ptrs = c_ptr + rows[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def _moe_sum_kernel(y_ptr, ids_ptr, out_ptr, H, expert_lo, expert_hi, stride_ym, stride_om,
                    TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for slot in tl.static_range(TOP_K):
        row = token * TOP_K + slot
        expert = tl.load(ids_ptr + row)
        # Rows of other ranks' experts were never written: load none of them (mask bound 0).
        bound = tl.where((expert >= expert_lo) & (expert < expert_hi), H, 0)
        acc += tl.load(y_ptr + row * stride_ym + offs, mask=offs < bound, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * stride_om + offs, acc.to(out_ptr.dtype.element_ty), mask=offs < H)


@dataclass(frozen=True)
class MoeRows:
    """How the GEMMs find each M-block's rows and expert: aligned blocks, or one row per block."""

    sorted_ids: torch.Tensor  # aligned: sorted_token_ids [L]; direct: topk_ids flat [T*k]
    expert_ids: torch.Tensor  # aligned: [L / BLOCK_M]; direct: unused (topk_ids again)
    num_post: torch.Tensor  # aligned: [1]; direct: unused
    num_blocks: int
    expert_lo: int
    num_local: int
    direct: bool


def use_direct_rows(num_rows: int, top_k: int, num_local: int) -> bool:
    """One M-block per (token, slot) row, no alignment: one token's rows (distinct experts), or
    rows few enough next to the experts (<= a quarter) that two rows rarely share an expert.

    The direct path: M-block b is flat row b alone (its other BLOCK_M - 1 rows masked) and its expert
    is read from topk_ids in the GEMM; a row of another rank's expert exits at once. Rows routed to
    the same expert read its weights once each, so it is taken only while such repeats are rare; it
    saves the alignment launch, most of a batch-1 MoE layer's fixed cost beside the GEMMs.
    """
    return num_rows <= top_k or 4 * num_rows <= num_local


def _grouped_gemm(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, rows: MoeRows, a_row_div: int,
                  row_weights: torch.Tensor | None, tiles: MoeTiles) -> None:
    """out[row] = a[row // a_row_div] @ w[expert(row)]^T (* row_weights[row]) for every routed row."""
    n, k = w.shape[1], w.shape[2]
    grid = (rows.num_blocks * triton.cdiv(n, tiles.block_n),)
    _moe_gemm_kernel[grid](
        a, w, out, out if row_weights is None else row_weights, rows.sorted_ids, rows.expert_ids, rows.num_post,
        out.shape[0], n, k, a_row_div, rows.expert_lo, rows.num_local,
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2), out.stride(0), out.stride(1),
        MUL_ROW_WEIGHT=row_weights is not None, IEEE=a.dtype == torch.float32, DIRECT=rows.direct,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, GROUP_M=tiles.group_m,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )


def fused_moe(
    x: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2I, H] gate rows then up rows, this rank's experts
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, k]
    topk_ids: torch.Tensor,  # [T, k] global expert ids
    local_expert_start: int = 0,
    num_local: int | None = None,
    tiles: MoeTiles | None = None,  # override of moe_tiles (the tile sweep)
    direct: bool | None = None,  # one M-block per row, no alignment (None: use_direct_rows decides)
) -> torch.Tensor:  # [T, H], x's dtype; only this rank's experts contribute
    """sum_slot w[t, slot] * down_e(silu(gate_e(x[t])) * up_e(x[t])) over the slots with local experts."""
    num_local = w13.shape[0] if num_local is None else num_local
    hidden, inter = x.shape[1], w2.shape[2]
    if w13.shape != (num_local, 2 * inter, hidden) or w2.shape != (num_local, hidden, inter):
        raise ValueError(f"w13 {tuple(w13.shape)} / w2 {tuple(w2.shape)} do not match {num_local} experts "
                         f"of hidden {hidden}")
    element_size = max(x.element_size(), w13.element_size())

    def gemm(a: torch.Tensor, up: bool, out: torch.Tensor, rows: MoeRows, a_row_div: int,
             row_weights: torch.Tensor | None, tiles: MoeTiles) -> None:
        _grouped_gemm(a, w13 if up else w2, out, rows, a_row_div, row_weights, tiles)

    return moe_pipeline(x, topk_weights, topk_ids, local_expert_start, num_local, inter, gemm, element_size,
                        tiles, direct)


GroupedGemm = Callable[[torch.Tensor, bool, torch.Tensor, MoeRows, int, "torch.Tensor | None", MoeTiles], None]


def moe_pipeline(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, local_expert_start: int,
                 num_local: int, inter: int, gemm: GroupedGemm, element_size: int,
                 tiles: MoeTiles | None = None, direct: bool | None = None) -> torch.Tensor:
    """Alignment, up GEMM, SiLU-and-mul, down GEMM and the per-token sum, with the two grouped GEMMs
    given by `gemm(a, up, out, rows, a_row_div, row_weights, tiles)` (up: the w13 GEMM, else w2's):
    plain weights here, quantized experts in workers/quant/kernels/moe.py."""
    num_tokens, hidden = x.shape
    top_k = topk_ids.shape[1]
    if topk_weights.shape != topk_ids.shape or topk_ids.shape[0] != num_tokens:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} / topk_weights {tuple(topk_weights.shape)} "
                         f"must both be [{num_tokens}, k]")
    if num_tokens == 0 or num_local == 0:
        return torch.zeros_like(x)
    out = torch.empty_like(x)
    x = x.contiguous()
    topk_ids = topk_ids.contiguous()
    num_rows = num_tokens * top_k
    tiles = tiles or moe_tiles(num_rows, num_local, x.is_cuda, element_size)
    if use_direct_rows(num_rows, top_k, num_local) if direct is None else direct:
        flat_ids = topk_ids.reshape(-1)
        rows = MoeRows(flat_ids, flat_ids, flat_ids, num_rows, local_expert_start, num_local, direct=True)
    else:
        # Looked up on the module at call time: tests re-decorate kernel modules for the interpreter.
        sorted_ids, expert_ids, num_post = moe_align.moe_align_block_size(topk_ids, tiles.block_m,
                                                                          local_expert_start, num_local)
        rows = MoeRows(sorted_ids, expert_ids, num_post, expert_ids.shape[0], local_expert_start, num_local,
                     direct=False)
    # Rows of other ranks' experts are never written nor read back; zeros only keep the CPU
    # interpreter's numpy from warning about exp(garbage) in the activation.
    h = (torch.empty if x.is_cuda else torch.zeros)(num_rows, 2 * inter, dtype=x.dtype, device=x.device)
    gemm(x, True, h, rows, top_k, None, tiles)
    act = silu_and_mul(h)  # [T*k, I]
    y = torch.empty(num_rows, hidden, dtype=x.dtype, device=x.device)
    gemm(act, False, y, rows, 1, topk_weights.contiguous().reshape(-1), tiles)
    block_h = min(1024, triton.next_power_of_2(hidden))
    _moe_sum_kernel[(num_tokens, triton.cdiv(hidden, block_h))](
        y, topk_ids, out, hidden, local_expert_start, local_expert_start + num_local, y.stride(0), out.stride(0),
        TOP_K=top_k, BLOCK_H=block_h, num_warps=4,
    )
    return out

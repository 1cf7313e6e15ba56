"""Fused mixture-of-experts MLP: token alignment + grouped GEMM, CUDA-graph safe.

Data flow of `fused_moe(x [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_weights [T, k], topk_ids [T, k])`
over the E experts this rank holds (global ids `local_expert_start .. + E`):

1. `moe_align_block_size` (moe_align.py: one or two Triton launches, static grids, no host sync;
   torch reference `moe_reference.moe_align_block_size_torch`) sorts the T*k (token, slot)
   rows by local expert and pads each expert's group to a multiple of BLOCK_M:
   `sorted_token_ids [L]` holds flat row ids `t * k + slot` (padding: the sentinel T*k),
   `expert_ids [L / BLOCK_M]` the local expert of each M-block (-1 past the end) and
   `num_tokens_post_padded [1]` the used length. Rows routed to other ranks' experts (EP) are
   in no block. L = T*k + min(E, T*k) * (BLOCK_M - 1), rounded up to BLOCK_M, bounds the
   padded length for any routing: at most min(E, T*k) groups each gain < BLOCK_M padding.
2. `_moe_gemm_kernel` (grid fixed from L, so a captured graph replays for any routing): the
   program of M-block b and N-tile n computes, for the BLOCK_M rows of b (one expert e),
   `C[row] = A[row // a_row_div] @ W[e]^T` in fp32, optionally times the row's routing weight,
   and stores into `C [T*k, N]`. Blocks at or past `num_tokens_post_padded` (or with expert -1)
   exit at once; padding rows are masked.
   Up:   A = x (a_row_div = k)          -> h [T*k, 2I]
   SiLU-and-mul (activation.py kernel)  -> a [T*k, I]
   Down: A = a (a_row_div = 1), weighted -> y [T*k, H]
3. `_moe_sum_kernel` sums each token's k rows of y in fp32, reading only slots whose expert is
   local (rows of other ranks' experts were never written), and rounds once -> out [T, H].

Tiles: `moe_tiles` looks the average rows per expert (T*k / E) up in `CUDA_TILE_BANDS`, a table
of rows-per-expert bands (decode: BLOCK_M 16, prefill: up to 64); `benchmarks/moe_gpu_check.py
--sweep` times candidate tiles on the GPU. The CPU interpreter (tests) uses small tiles. The
matmuls read fp32 operands with `input_precision="ieee"` so fp32 results match torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from shardserve.workers.kernels import moe_align
from shardserve.workers.kernels.activation import silu_and_mul
from shardserve.workers.kernels.moe_align import moe_align_block_size, padded_length  # re-exported

__all__ = ["CUDA_TILE_BANDS", "MoeTiles", "fused_moe", "moe_align_block_size", "moe_tiles", "padded_length"]


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


def moe_tiles(num_rows: int, num_local: int, on_cuda: bool) -> MoeTiles:
    """Tile config for num_rows = T * k (token, slot) rows over num_local experts."""
    if not on_cuda:
        return INTERPRETER_TILES
    per_expert = num_rows / max(num_local, 1)
    return next(tiles for bound, tiles in CUDA_TILE_BANDS if per_expert <= bound)


@triton.jit(do_not_specialize=["num_rows"])  # one compile for every batch size (odd T*k included)
def _moe_gemm_kernel(
    a_ptr, w_ptr, c_ptr, row_weight_ptr, sorted_ids_ptr, expert_ids_ptr, num_post_ptr,
    num_rows, N, K, a_row_div,
    stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_cm, stride_cn,
    MUL_ROW_WEIGHT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Swizzle: GROUP_M consecutive M-blocks walk the N-tiles together (A tiles reused from L2).
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_m = tl.num_programs(0) // num_pid_n
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_size
    pid_n = (pid % in_group) // group_size

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


def _grouped_gemm(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, sorted_ids: torch.Tensor,
                  expert_ids: torch.Tensor, num_post: torch.Tensor, a_row_div: int,
                  row_weights: torch.Tensor | None, tiles: MoeTiles) -> None:
    """out[row] = a[row // a_row_div] @ w[expert(row)]^T (* row_weights[row]) for every sorted row."""
    n, k = w.shape[1], w.shape[2]
    grid = (expert_ids.shape[0] * triton.cdiv(n, tiles.block_n),)
    _moe_gemm_kernel[grid](
        a, w, out, out if row_weights is None else row_weights, sorted_ids, expert_ids, num_post,
        out.shape[0], n, k, a_row_div,
        a.stride(0), a.stride(1), w.stride(0), w.stride(1), w.stride(2), out.stride(0), out.stride(1),
        MUL_ROW_WEIGHT=row_weights is not None, IEEE=a.dtype == torch.float32,
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
) -> torch.Tensor:  # [T, H], x's dtype; only this rank's experts contribute
    """sum_slot w[t, slot] * down_e(silu(gate_e(x[t])) * up_e(x[t])) over the slots with local experts."""
    num_local = w13.shape[0] if num_local is None else num_local
    num_tokens, hidden = x.shape
    top_k = topk_ids.shape[1]
    inter = w2.shape[2]
    if w13.shape != (num_local, 2 * inter, hidden) or w2.shape != (num_local, hidden, inter):
        raise ValueError(f"w13 {tuple(w13.shape)} / w2 {tuple(w2.shape)} do not match {num_local} experts "
                         f"of hidden {hidden}")
    if topk_weights.shape != topk_ids.shape or topk_ids.shape[0] != num_tokens:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} / topk_weights {tuple(topk_weights.shape)} "
                         f"must both be [{num_tokens}, k]")
    if num_tokens == 0 or num_local == 0:
        return torch.zeros_like(x)
    out = torch.empty_like(x)
    x = x.contiguous()
    topk_ids = topk_ids.contiguous()
    num_rows = num_tokens * top_k
    tiles = tiles or moe_tiles(num_rows, num_local, x.is_cuda)
    # Looked up on the module at call time: tests re-decorate kernel modules for the interpreter.
    sorted_ids, expert_ids, num_post = moe_align.moe_align_block_size(topk_ids, tiles.block_m, local_expert_start,
                                                                      num_local)
    # Rows of other ranks' experts are never written nor read back; zeros only keep the CPU
    # interpreter's numpy from warning about exp(garbage) in the activation.
    h = (torch.empty if x.is_cuda else torch.zeros)(num_rows, 2 * inter, dtype=x.dtype, device=x.device)
    _grouped_gemm(x, w13, h, sorted_ids, expert_ids, num_post, top_k, None, tiles)
    act = silu_and_mul(h)  # [T*k, I]
    y = torch.empty(num_rows, hidden, dtype=x.dtype, device=x.device)
    _grouped_gemm(act, w2, y, sorted_ids, expert_ids, num_post, 1, topk_weights.contiguous().reshape(-1), tiles)
    block_h = min(1024, triton.next_power_of_2(hidden))
    _moe_sum_kernel[(num_tokens, triton.cdiv(hidden, block_h))](
        y, topk_ids, out, hidden, local_expert_start, local_expert_start + num_local, y.stride(0), out.stride(0),
        TOP_K=top_k, BLOCK_H=block_h, num_warps=4,
    )
    return out

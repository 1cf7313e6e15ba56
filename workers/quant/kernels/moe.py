"""Quantized experts in the fused MoE: stacked packing at load, grouped GEMMs that dequantize in the main loop.

Data flow: `pack_moe(experts, dtype)` takes this rank's experts of one projection (a list of E
unpacked weights of ../weights.py, all INT4 groups, all INT8 or all FP8) and stacks them once:
  - INT4 / INT8: each expert in packed.py's plane layout (`pack_planes`; INT8 as u = q + 128 with
    one group spanning K; 8-bit groups of GPTQ / compressed-tensors as they are), words [E, N, KW], scales and mins [E, G, N] in the activation
    dtype. PLANE is 32 or 16 columns (tl.dot's smallest K), chosen so a plane lies inside a group
    and K pads to few chunks (the Qwen3-30B-A3B TP 2 down projection has K = 384);
  - act-order experts (GPTQ g_idx; columns sorted by group): perm [E, K], the activation gathered per column;
  - FP8: e4m3 weights [E, N, K] as they are and fp32 per-channel scales [E, N]. W8A16: each tile is
    widened to the activation dtype before tl.dot and the scale applied once to the accumulator
    (no activation quantization: the MoE's per-expert GEMMs are small and weight-bound).
`fused_moe_quant(x, w13, w2, topk_weights, topk_ids, ...)` runs fused_moe.py's `moe_pipeline`
(alignment or direct rows, SiLU-and-mul, per-token sum: the same static grids, no host sync, so
CUDA-graph safe) with `_moe_qgemm_kernel` as its grouped GEMM: per M-block of one expert, a
[PLANE, BLOCK_N] tile of words is read once per chunk and each plane is unpacked with packed.py's
`_unpack` (w = f * 2^BITS s + (m - 2^BITS s), one FMA a weight), cast to the activation dtype and
fed to tl.dot (fp32 operands: IEEE, as fused_moe.py); fp32 accumulation, optional routing weight, one
rounding at the store. Tiles: fused_moe.py's bands, stages lowered to fit shared memory (`fit_stages`).
`fused_moe_quant_reference`: dequantize every expert, then moe_reference.py's torch MoE.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from shardserve.workers.kernels import fused_moe as fm
from shardserve.workers.kernels.moe_reference import fused_moe_reference
from shardserve.workers.quant.kernels.packed import _unpack, pack_planes, pad_groups
from shardserve.workers.quant.weights import Fp8Weight, GroupedWeight, Int8Weight, QuantizedWeight

FP8_BLOCK_K = 32  # K tile of the FP8 GEMM under the interpreter; on CUDA the band's block_k


@dataclass(frozen=True)
class MoePacked:
    """One projection of this rank's E experts, as the grouped GEMM reads it.

    Planes (bits 4 or 8): words int32 [E, N, KW]; scales / mins [E, G, N] in the activation dtype.
    FP8 (bits 0): words = e4m3 [E, N, K]; scales fp32 [E, 1, N]; mins unused (= scales)."""

    words: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor
    bits: int  # 4, 8 (planes) or 0 (fp8)
    plane: int  # columns per plane (planes only)
    group_size: int  # columns per scale (INT8: the padded K, one group)
    k: int  # input features
    perm: torch.Tensor | None = None  # int32 [E, K]: act-order, column c of expert e reads input perm[e, c]

    @property
    def num_experts(self) -> int:
        return self.words.shape[0]

    @property
    def n(self) -> int:
        return self.words.shape[1]


def moe_plane(bits: int, group_size: int, k: int) -> int:
    """32 or 16 columns per plane: dividing the group, and 32 only when K fills whole 32-column chunks."""
    planes = 32 // bits
    for plane in (32, 16):
        if group_size % plane == 0 and (plane == 16 or k % (planes * plane) == 0):
            return plane
    raise ValueError(f"quantized experts need a group size that is a multiple of 16, got {group_size}")


def pack_moe(experts: list[QuantizedWeight], dtype: torch.dtype) -> MoePacked:
    """E unpacked weights [N, K] of one kind -> the stacked runtime form, on their device."""
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"quantized expert activations must be bfloat16, float16 or float32, got {dtype}")
    if not experts:
        raise ValueError("pack_moe needs at least one expert")
    first = experts[0]
    if any(type(w) is not type(first) or w.q.shape != first.q.shape for w in experts):
        raise ValueError("every expert of a projection must have the same quantized kind and shape")
    n, k = first.q.shape
    perm = None
    if isinstance(first, Fp8Weight):
        q = torch.stack([w.q for w in experts]).contiguous()
        scales = torch.stack([w.scales.float() for w in experts]).view(len(experts), 1, n).contiguous()
        return MoePacked(q, scales, scales, bits=0, plane=0, group_size=k, k=k)
    if isinstance(first, Int8Weight):
        u = [(w.q.to(torch.int16) + 128).to(torch.uint8) for w in experts]
        bits, scales, mins = 8, [w.scales.float().view(n, 1) for w in experts], None
        plane = moe_plane(8, 128, k)  # INT8 has one group a row: any plane fits it
        group = -(-k // (4 * plane)) * 4 * plane  # the padded K: one group a row
    elif isinstance(first, GroupedWeight):
        if first.bits not in (4, 8) or any(w.bits != first.bits for w in experts):
            raise ValueError(f"quantized experts take 4- or 8-bit groups, got {first.bits}-bit")
        if any(w.perm is not None for w in experts):  # act-order: each expert gathers its inputs in its order
            identity = torch.arange(k, device=first.q.device)
            perm = torch.stack([identity if w.perm is None else w.perm for w in experts]).to(torch.int32)
        u, bits = [w.q for w in experts], first.bits
        scales, mins = [w.scales for w in experts], [w.mins for w in experts]
        group = first.group_size
        plane = moe_plane(bits, group, k)
    else:
        raise TypeError(f"no fused MoE path for {type(first).__name__}")
    words = pack_planes(torch.cat(u), bits, plane).view(len(experts), n, -1)
    groups = -(-(words.shape[2] * (32 // bits)) // group)
    if mins is None:  # INT8: w = u s - 128 s
        mins = [-128.0 * s for s in scales]
    s = torch.stack([pad_groups(t, groups, dtype) for t in scales])
    m = torch.stack([pad_groups(t, groups, dtype) for t in mins])
    return MoePacked(words.contiguous(), s, m, bits=bits, plane=plane, group_size=group, k=k, perm=perm)


@triton.jit
def _block_rows(sorted_ids_ptr, expert_ids_ptr, num_post_ptr, pid_m, num_rows, expert_lo, num_local,
                DIRECT: tl.constexpr, BLOCK_M: tl.constexpr):
    """(expert, rows [M], row_mask [M], skip) of M-block pid_m, as fused_moe.py's `_moe_gemm_kernel` finds them."""
    if DIRECT:  # M-block pid_m is flat row pid_m alone; sorted_ids_ptr is topk_ids [T*k]
        expert = tl.load(sorted_ids_ptr + pid_m).to(tl.int64) - expert_lo
        skip = (expert < 0) | (expert >= num_local)  # another EP rank's expert
        first = tl.arange(0, BLOCK_M) == 0
        rows = tl.where(first, pid_m, num_rows).to(tl.int64)
        row_mask = first
    else:
        past_end = pid_m * BLOCK_M >= tl.load(num_post_ptr)
        expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
        skip = past_end | (expert < 0)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = tl.load(sorted_ids_ptr + offs_m).to(tl.int64)
        row_mask = rows < num_rows  # padding rows hold the sentinel num_rows
    return expert, rows, row_mask, skip


@triton.jit(do_not_specialize=["num_rows", "expert_lo", "num_local"])
def _moe_qgemm_kernel(
    a_ptr, w_ptr, s_ptr, m_ptr, c_ptr, row_weight_ptr, sorted_ids_ptr, expert_ids_ptr, num_post_ptr, perm_ptr,
    num_rows, N, K, KW, a_row_div, expert_lo, num_local,
    stride_am, stride_we, stride_se, stride_cm,
    BITS: tl.constexpr, PLANES: tl.constexpr, PLANE: tl.constexpr, GROUP: tl.constexpr, MUL_ROW_WEIGHT: tl.constexpr,
    PERM: tl.constexpr,
    DIRECT: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C[row] = A[row // a_row_div] @ dequant(W[expert(row)])^T for the routed rows (see the module docstring)."""
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_m = tl.num_programs(0) // num_pid_n
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_size
    pid_n = (pid % in_group) // group_size
    expert, rows, row_mask, skip = _block_rows(sorted_ids_ptr, expert_ids_ptr, num_post_ptr, pid_m, num_rows,
                                               expert_lo, num_local, DIRECT=DIRECT, BLOCK_M=BLOCK_M)
    if skip:
        return
    dtype = c_ptr.dtype.element_ty
    CHUNK: tl.constexpr = PLANES * PLANE  # planes: columns a chunk of PLANE words covers
    SCALE: tl.constexpr = 1 << BITS
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    a_rows = a_ptr + (rows // a_row_div)[:, None] * stride_am  # [M, 1]
    s_expert = s_ptr + expert * stride_se
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if BITS == 0:  # FP8 weights [E, N, K]: widened to the activation dtype, per-channel scale at the end
        offs_k = tl.arange(0, BLOCK_K)
        w_tile = w_ptr + expert * stride_we + offs_n[None, :].to(tl.int64) * K + offs_k[:, None]  # [K, N]
        for k0 in range(0, K, BLOCK_K):
            k_mask = offs_k < K - k0
            a = tl.load(a_rows + k0 + offs_k[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_tile + k0, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            w = w.to(tl.float32).to(dtype)
            if IEEE:
                acc = tl.dot(a, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w, acc)
        acc = acc * tl.load(s_expert + offs_n, mask=n_mask, other=0.0)[None, :]
    else:  # planes: one [PLANE, BLOCK_N] tile of words a chunk, each plane dequantized in registers
        offs_j = tl.arange(0, PLANE)
        w_tile = w_ptr + expert * stride_we + offs_n[None, :].to(tl.int64) * KW + offs_j[:, None]  # [PLANE, N]
        m_expert = m_ptr + expert * stride_se
        for c in range(0, KW // PLANE):
            words = tl.load(w_tile + c * PLANE, mask=n_mask[None, :], other=0)
            for i in tl.static_range(PLANES):
                col0 = c * CHUNK + i * PLANE
                g = (col0 // GROUP) * N
                s = tl.load(s_expert + g + offs_n, mask=n_mask, other=0.0).to(tl.float32) * SCALE
                m = tl.load(m_expert + g + offs_n, mask=n_mask, other=0.0).to(tl.float32) - s
                w = (_unpack(words, i, BITS) * s[None, :] + m[None, :]).to(dtype)  # [PLANE, BLOCK_N]
                cols = col0 + offs_j
                if PERM:  # act-order: sorted column c holds input feature perm[expert, c]
                    src = tl.load(perm_ptr + expert * K + cols, mask=cols < K, other=0).to(tl.int64)
                else:
                    src = cols
                a = tl.load(a_rows + src[None, :], mask=row_mask[:, None] & (cols[None, :] < K), other=0.0)
                if IEEE:
                    acc = tl.dot(a, w, acc, input_precision="ieee")
                else:
                    acc = tl.dot(a, w, acc)
    if MUL_ROW_WEIGHT:
        row_weight = tl.load(row_weight_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        acc = acc * row_weight[:, None]
    c_ptrs = c_ptr + rows[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(dtype), mask=row_mask[:, None] & n_mask[None, :])


def stage_bytes(tiles: fm.MoeTiles, w: MoePacked, element_size: int) -> int:
    """Shared memory one pipeline stage of the main loop may take: a chunk's tile of words and the
    activation tiles of its planes (FP8: a [BLOCK_K, BLOCK_N] e4m3 tile and a [BLOCK_M, BLOCK_K] one)."""
    if w.bits == 0:
        return tiles.block_k * tiles.block_n + tiles.block_m * tiles.block_k * element_size
    planes = 32 // w.bits
    return w.plane * tiles.block_n * 4 + planes * tiles.block_m * w.plane * element_size


def fit_stages(tiles: fm.MoeTiles, w: MoePacked, element_size: int) -> fm.MoeTiles:
    """The bf16 bands of fused_moe.py with fewer stages where a chunk's planes would overflow shared
    memory (block_m is kept: the alignment was done with it)."""
    stages = tiles.num_stages
    while stages > 1 and stage_bytes(tiles, w, element_size) * stages > fm.SMEM_BUDGET_BYTES:
        stages -= 1
    return tiles if stages == tiles.num_stages else replace(tiles, num_stages=stages)


def _qgemm(a: torch.Tensor, w: MoePacked, out: torch.Tensor, rows: fm.MoeRows, a_row_div: int,
           row_weights: torch.Tensor | None, tiles: fm.MoeTiles) -> None:
    if a.stride(1) != 1:
        a = a.contiguous()
    if a.is_cuda:
        tiles = fit_stages(tiles, w, a.element_size())
    grid = (rows.num_blocks * triton.cdiv(w.n, tiles.block_n),)
    block_k = FP8_BLOCK_K if not a.is_cuda else tiles.block_k
    _moe_qgemm_kernel[grid](
        a, w.words, w.scales, w.mins, out, out if row_weights is None else row_weights,
        rows.sorted_ids, rows.expert_ids, rows.num_post, w.words if w.perm is None else w.perm,
        out.shape[0], w.n, w.k, w.words.shape[2], a_row_div, rows.expert_lo, rows.num_local,
        a.stride(0), w.words.stride(0), w.scales.stride(0), out.stride(0),
        BITS=w.bits, PLANES=32 // w.bits if w.bits else 1, PLANE=max(w.plane, 16), GROUP=w.group_size, MUL_ROW_WEIGHT=row_weights is not None,
        PERM=w.perm is not None,
        DIRECT=rows.direct, IEEE=a.dtype == torch.float32, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
        BLOCK_K=block_k, GROUP_M=tiles.group_m,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )


def fused_moe_quant(
    x: torch.Tensor,  # [T, H]
    w13: MoePacked,  # E experts, N = 2I (gate rows then up rows), K = H
    w2: MoePacked,  # E experts, N = H, K = I
    topk_weights: torch.Tensor,  # [T, k]
    topk_ids: torch.Tensor,  # [T, k] global expert ids
    local_expert_start: int = 0,
    tiles: fm.MoeTiles | None = None,
    direct: bool | None = None,
) -> torch.Tensor:  # [T, H] in x's dtype; only this rank's experts contribute
    """fused_moe.py's `fused_moe` with quantized experts (same routing, same result up to the weights' rounding)."""
    num_local, hidden, inter = w13.num_experts, x.shape[1], w2.k
    if (w2.num_experts != num_local or w13.n != 2 * inter or w13.k != hidden or w2.n != hidden):
        raise ValueError(f"quantized w13 [{w13.num_experts}, {w13.n}, {w13.k}] / w2 [{w2.num_experts}, {w2.n}, "
                         f"{w2.k}] do not match experts of hidden {hidden}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"x must be bfloat16, float16 or float32, got {x.dtype}")
    if w13.bits and w13.scales.dtype != x.dtype:
        raise ValueError(f"experts were packed for {w13.scales.dtype}, x is {x.dtype}")

    def gemm(a: torch.Tensor, up: bool, out: torch.Tensor, rows: fm.MoeRows, a_row_div: int,
             row_weights: torch.Tensor | None, tiles: fm.MoeTiles) -> None:
        _qgemm(a, w13 if up else w2, out, rows, a_row_div, row_weights, tiles)

    return fm.moe_pipeline(x, topk_weights, topk_ids, local_expert_start, num_local, inter, gemm,
                           x.element_size(), tiles, direct)


def dequantize_experts(experts: list[QuantizedWeight], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[E, N, K] float weights of a projection's experts."""
    return torch.stack([w.dequantize(dtype) for w in experts])


def fused_moe_quant_reference(x: torch.Tensor, w13: list[QuantizedWeight], w2: list[QuantizedWeight],
                              topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                              local_expert_start: int = 0) -> torch.Tensor:
    """The torch reference: every expert dequantized to fp32, then moe_reference.py's MoE."""
    return fused_moe_reference(x, dequantize_experts(w13).to(x.device), dequantize_experts(w2).to(x.device),
                               topk_weights, topk_ids, local_expert_start, len(w13))

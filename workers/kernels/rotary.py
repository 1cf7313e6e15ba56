"""Rotary position embedding, neox style (Hugging Face Llama's `rotate_half`).

Convention: the cache holds `cos_cache, sin_cache [max_position, R/2]` with
`cos_cache[p, i] = cos(p * theta_i)` (rope scaling already folded into theta_i), where
R = 2 * cache width is the rotary dim (R <= D; the last D - R dims pass through). For a
head vector x, with `x1 = x[:R/2]`, `x2 = x[R/2:R]`:
`out[:R/2] = x1 * cos - x2 * sin`, `out[R/2:R] = x2 * cos + x1 * sin` — exactly
`x * cat(cos, cos) + rotate_half(x) * cat(sin, sin)`, Hugging Face's `apply_rotary_pos_emb`.

Data flow: `positions [T]` pick one cache row per token; one program per token loads that
row and rotates every q head `[Hq, R]` and k head `[Hkv, R]` of the token in fp32, rounding
once to the input dtype. In place by default; `inplace=False` rotates copies.
With `kv_write=(v, kv_cache, slot_mapping)` the same program also stores the token's rotated K
and its V into the paged cache (what `kv_cache_write` does; negative slots skip), and with
`qk_norm=(q_weight [D], k_weight [D], eps)` (Qwen3's per-head RMSNorm of q and k; R must equal D)
it first normalises each head as Hugging Face's RMSNorm does (fp32 statistics, rounded as HF
rounds). Why fused: at batch 1 every launch is a visible share of the step, and in torch ops that
norm alone was ~12 launches per layer (benchmarks/README.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from shardserve.parallel.kernels.pdl import pdl_options, release_next, wait_for_previous
from shardserve.workers.kernels.kv_cache_write import store_kv_row


@triton.jit
def _rotate_heads(x_ptr, t, stride_t, stride_h, stride_d, cos, sin, norm_w_ptr, eps,
                  NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
                  QK_NORM: tl.constexpr):
    offs_h = tl.arange(0, HEADS_PAD)  # [H_PAD]
    offs_i = tl.arange(0, HALF_PAD)  # [R/2 padded]
    i_mask = offs_i < HALF
    mask = (offs_h < NUM_HEADS)[:, None] & i_mask[None, :]
    ptr1 = x_ptr + t * stride_t + offs_h[:, None] * stride_h + offs_i[None, :] * stride_d  # [H_PAD, R/2]
    ptr2 = ptr1 + HALF * stride_d
    x1 = tl.load(ptr1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr2, mask=mask, other=0.0).to(tl.float32)
    if QK_NORM:  # per-head RMSNorm over the whole head (R == D), rounded as the torch module rounds
        dtype = x_ptr.dtype.element_ty
        rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)  # [H_PAD]
        w1 = tl.load(norm_w_ptr + offs_i, mask=i_mask, other=0.0).to(tl.float32)
        w2 = tl.load(norm_w_ptr + HALF + offs_i, mask=i_mask, other=0.0).to(tl.float32)
        x1 = ((x1 * rstd[:, None]).to(dtype).to(tl.float32) * w1[None, :]).to(dtype).to(tl.float32)
        x2 = ((x2 * rstd[:, None]).to(dtype).to(tl.float32) * w2[None, :]).to(dtype).to(tl.float32)
    tl.store(ptr1, (x1 * cos[None, :] - x2 * sin[None, :]).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(ptr2, (x2 * cos[None, :] + x1 * sin[None, :]).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, positions_ptr, cos_ptr, sin_ptr,
    v_ptr, cache_ptr, slot_mapping_ptr,  # used only with WRITE_KV
    q_norm_ptr, k_norm_ptr, eps,  # used only with QK_NORM
    stride_qt, stride_qh, stride_qd,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_cos, stride_sin,
    stride_ckv, stride_cblk, stride_coff, stride_chead, stride_cd,
    NUM_Q_HEADS: tl.constexpr, Q_HEADS_PAD: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr, KV_HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr,
    WRITE_KV: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    QK_NORM: tl.constexpr, USE_PDL: tl.constexpr,
):
    wait_for_previous(USE_PDL)
    release_next(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + t).to(tl.int64)
    offs_i = tl.arange(0, HALF_PAD)
    i_mask = offs_i < HALF
    cos = tl.load(cos_ptr + pos * stride_cos + offs_i, mask=i_mask, other=0.0).to(tl.float32)  # [R/2]
    sin = tl.load(sin_ptr + pos * stride_sin + offs_i, mask=i_mask, other=0.0).to(tl.float32)  # [R/2]
    _rotate_heads(q_ptr, t, stride_qt, stride_qh, stride_qd, cos, sin, q_norm_ptr, eps,
                  NUM_Q_HEADS, Q_HEADS_PAD, HALF, HALF_PAD, QK_NORM)
    _rotate_heads(k_ptr, t, stride_kt, stride_kh, stride_kd, cos, sin, k_norm_ptr, eps,
                  NUM_KV_HEADS, KV_HEADS_PAD, HALF, HALF_PAD, QK_NORM)
    if WRITE_KV:
        slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
        if slot >= 0:
            tl.debug_barrier()  # the rotated K rows were stored by other threads of this program
            store_kv_row(t, slot, k_ptr, v_ptr, cache_ptr, stride_kt, stride_kh, stride_kd,
                         stride_vt, stride_vh, stride_vd, stride_ckv, stride_cblk, stride_coff, stride_chead, stride_cd,
                         NUM_KV_HEADS, KV_HEADS_PAD, HEAD_DIM, DIM_PAD, BLOCK_SIZE)


def rotary_embedding(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D]
    positions: torch.Tensor,  # [T] int, each in [0, max_position)
    cos_cache: torch.Tensor,  # [max_position, R/2], last dim contiguous
    sin_cache: torch.Tensor,  # [max_position, R/2], last dim contiguous
    inplace: bool = True,
    kv_write: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,  # (v, kv_cache, slot_mapping)
    qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,  # (q_weight [D], k_weight [D], eps)
) -> tuple[torch.Tensor, torch.Tensor]:  # (q [T, Hq, D], k [T, Hkv, D]) rotated
    """Neox-style rotary embedding of q and k at `positions` (see the module docstring); with
    `kv_write`, the rotated K and V also land in `kv_cache [2, blocks, block_size, Hkv, D]`;
    with `qk_norm`, every head is RMS-normalised first."""
    num_tokens, num_q_heads, head_dim = q.shape
    k_tokens, num_kv_heads, k_head_dim = k.shape
    half = cos_cache.shape[-1]
    if (k_tokens, k_head_dim) != (num_tokens, head_dim):
        raise ValueError(f"k shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} in tokens / head_dim")
    if positions.shape != (num_tokens,):
        raise ValueError(f"positions shape {tuple(positions.shape)} != ({num_tokens},)")
    if sin_cache.shape != cos_cache.shape or cos_cache.dim() != 2 or not 1 <= 2 * half <= head_dim:
        raise ValueError(
            f"cos/sin caches must both be [max_position, R/2] with 2 <= R <= head_dim {head_dim}, "
            f"got {tuple(cos_cache.shape)} and {tuple(sin_cache.shape)}"
        )
    if cos_cache.stride(-1) != 1 or sin_cache.stride(-1) != 1:
        raise ValueError("cos/sin caches must have a contiguous last dim")
    if qk_norm is not None:
        q_weight, k_weight, eps = qk_norm
        if 2 * half != head_dim or q_weight.shape != (head_dim,) or k_weight.shape != (head_dim,):
            raise ValueError(f"qk_norm needs rotary over the whole head ({2 * half} != {head_dim}) or weights "
                             f"of [{head_dim}], got {tuple(q_weight.shape)} / {tuple(k_weight.shape)}")
        q_weight, k_weight = q_weight.contiguous(), k_weight.contiguous()
    else:
        q_weight, k_weight, eps = cos_cache, cos_cache, 0.0  # unused (QK_NORM off)
    if not inplace:
        q, k = q.clone(), k.clone()
    if num_tokens == 0:
        return q, k
    if kv_write is not None:
        v, kv_cache, slot_mapping = kv_write
        if v.shape != k.shape or tuple(kv_cache.shape[3:]) != (num_kv_heads, head_dim):
            raise ValueError(f"v {tuple(v.shape)} / kv_cache {tuple(kv_cache.shape)} do not match k {tuple(k.shape)}")
        if slot_mapping.shape != (num_tokens,):
            raise ValueError(f"slot_mapping shape {tuple(slot_mapping.shape)} != ({num_tokens},)")
        v_strides, cache_strides, block_size = v.stride(), kv_cache.stride(), kv_cache.shape[2]
    else:
        v, kv_cache, slot_mapping = k, k, positions  # unused (WRITE_KV off)
        v_strides, cache_strides, block_size = k.stride(), (0,) * 5, 1
    _rotary_kernel[(num_tokens,)](
        q, k, positions, cos_cache, sin_cache,
        v, kv_cache, slot_mapping,
        q_weight, k_weight, eps,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        *v_strides,
        cos_cache.stride(0), sin_cache.stride(0),
        *cache_strides,
        NUM_Q_HEADS=num_q_heads, Q_HEADS_PAD=triton.next_power_of_2(num_q_heads),
        NUM_KV_HEADS=num_kv_heads, KV_HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HALF=half, HALF_PAD=triton.next_power_of_2(half),
        WRITE_KV=kv_write is not None, HEAD_DIM=head_dim, DIM_PAD=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=block_size, QK_NORM=qk_norm is not None,
        num_warps=4, **pdl_options(q.device),
    )
    return q, k

"""KV-cache write: scatter this step's keys and values into one layer's paged cache.

Data flow: `k, v [T, Hkv, D]` (any strides, e.g. views into a fused qkv projection) and
`slot_mapping [T]` come in; token t's K goes to `kv_cache[0, slot // block_size,
slot % block_size]` and its V to `kv_cache[1, ...]` — the `[Hkv, D]` row of that slot.
One program copies one token's K and V rows. A negative slot marks a padding token
(e.g. a CUDA-graph batch padded past the real tokens) and is skipped. The cache is written
in place; nothing is returned.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from shardserve.parallel.kernels.pdl import pdl_options, release_next, wait_for_previous


@triton.jit
def store_kv_row(
    t, slot, k_ptr, v_ptr, cache_ptr,
    stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
    stride_ckv, stride_cblk, stride_coff, stride_chead, stride_cd,
    NUM_KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    """Copy token t's K and V rows [Hkv, D] into the cache at `slot` (>= 0)."""
    offs_h = tl.arange(0, HEADS_PAD)  # [H_PAD]
    offs_d = tl.arange(0, DIM_PAD)  # [D_PAD]
    mask = (offs_h < NUM_KV_HEADS)[:, None] & (offs_d < HEAD_DIM)[None, :]
    dst = (slot // BLOCK_SIZE) * stride_cblk + (slot % BLOCK_SIZE) * stride_coff
    dst_offs = dst + offs_h[:, None] * stride_chead + offs_d[None, :] * stride_cd  # [H_PAD, D_PAD]
    k = tl.load(k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :] * stride_kd, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :] * stride_vd, mask=mask)
    tl.store(cache_ptr + dst_offs, k.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(cache_ptr + stride_ckv + dst_offs, v.to(cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _kv_cache_write_kernel(
    k_ptr, v_ptr, cache_ptr, slot_mapping_ptr,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_ckv, stride_cblk, stride_coff, stride_chead, stride_cd,
    NUM_KV_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, USE_PDL: tl.constexpr,
):
    wait_for_previous(USE_PDL)
    release_next(USE_PDL)
    t = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
    if slot < 0:
        return
    store_kv_row(t, slot, k_ptr, v_ptr, cache_ptr, stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
                 stride_ckv, stride_cblk, stride_coff, stride_chead, stride_cd,
                 NUM_KV_HEADS, HEADS_PAD, HEAD_DIM, DIM_PAD, BLOCK_SIZE)


def kv_cache_write(
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D], written in place
    slot_mapping: torch.Tensor,  # [T] int64 (or int32), block * block_size + offset; < 0 skips
) -> None:
    """Write each token's K and V rows into the paged cache at its slot."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if v.shape != k.shape:
        raise ValueError(f"k shape {tuple(k.shape)} != v shape {tuple(v.shape)}")
    _, num_blocks, block_size, cache_heads, cache_dim = kv_cache.shape
    if (cache_heads, cache_dim) != (num_kv_heads, head_dim):
        raise ValueError(
            f"k/v heads x dim {(num_kv_heads, head_dim)} != kv_cache heads x dim {(cache_heads, cache_dim)}"
        )
    if slot_mapping.shape != (num_tokens,):
        raise ValueError(f"slot_mapping shape {tuple(slot_mapping.shape)} != ({num_tokens},)")
    if num_tokens == 0:
        return
    _kv_cache_write_kernel[(num_tokens,)](
        k, v, kv_cache, slot_mapping,
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        *kv_cache.stride(),
        NUM_KV_HEADS=num_kv_heads, HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim, DIM_PAD=triton.next_power_of_2(head_dim), BLOCK_SIZE=block_size,
        num_warps=4, **pdl_options(k.device),
    )

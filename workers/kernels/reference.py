"""Torch references of the Triton kernels in this package, same names and signatures.

Data flow: each function takes exactly the arguments of its kernel twin and returns the same
result, computed with plain torch ops in fp32 and rounded once to the input dtype, as the
kernels do. The attention references gather each request's context from the paged cache
token by token (`block_tables[i, t // block_size]`, offset `t % block_size`) and run a dense
softmax, so they share no tiling, splitting or online-softmax logic with the kernels. They
run on any device and are the CPU fallback as well as the tests' ground truth.
"""

from __future__ import annotations

import torch


def _gather_context(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V [seq_len, Hkv, D] of one request, read from the paged cache."""
    block_size = kv_cache.shape[2]
    toks = torch.arange(seq_len, device=kv_cache.device)
    pages = block_table.long()[toks // block_size]
    offsets = toks % block_size
    return kv_cache[0, pages, offsets], kv_cache[1, pages, offsets]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, scale: float) -> torch.Tensor:
    """q [M, Hq, D] at absolute positions q_pos [M]; k, v [N, Hkv, D] at positions 0..N-1 -> [M, Hq, D] fp32."""
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)  # [N, Hq, D]
    v = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("mhd,nhd->hmn", q.float(), k) * scale  # [Hq, M, N]
    visible = torch.arange(k.shape[0], device=q.device)[None, :] <= q_pos[:, None]  # [M, N]
    scores = scores.masked_fill(~visible[None], float("-inf"))
    return torch.einsum("hmn,nhd->mhd", scores.softmax(dim=-1), v)


def paged_decode_attention(
    q: torch.Tensor,  # [B, Hq, D]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_num_blocks]
    seq_lens: torch.Tensor,  # [B]
    scale: float,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:  # [B, Hq, D]
    """Dense attention of each request's single query over its whole context.

    `max_seq_len` and `num_splits` only steer the kernel's work split; they are accepted and
    ignored here. A request with `seq_len == 0` yields zeros, as in the kernel.
    """
    out = torch.zeros_like(q)
    for b, seq_len in enumerate(seq_lens.tolist()):
        if seq_len == 0:
            continue
        k, v = _gather_context(kv_cache, block_tables[b], seq_len)
        pos = torch.tensor([seq_len - 1], device=q.device)
        out[b] = _attend(q[b : b + 1], k, v, pos, scale)[0].to(q.dtype)
    return out


def extend_attention(
    q: torch.Tensor,  # [T, Hq, D]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # [R, max_num_blocks]
    query_start_loc: torch.Tensor,  # [R + 1]
    seq_lens: torch.Tensor,  # [R]
    scale: float,
) -> torch.Tensor:  # [T, Hq, D]
    """Causal attention of request i's query rows (positions seq_len - query_len + j) over its context."""
    out = torch.zeros_like(q)
    starts = query_start_loc.tolist()
    for i, seq_len in enumerate(seq_lens.tolist()):
        lo, hi = starts[i], starts[i + 1]
        if hi == lo:
            continue
        k, v = _gather_context(kv_cache, block_tables[i], seq_len)
        pos = torch.arange(seq_len - (hi - lo), seq_len, device=q.device)
        out[lo:hi] = _attend(q[lo:hi], k, v, pos, scale).to(q.dtype)
    return out


def kv_cache_write(
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D], written in place
    slot_mapping: torch.Tensor,  # [T]; < 0 skips
) -> None:
    block_size = kv_cache.shape[2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    kv_cache[0, slots // block_size, slots % block_size] = k[keep].to(kv_cache.dtype)
    kv_cache[1, slots // block_size, slots % block_size] = v[keep].to(kv_cache.dtype)


def rmsnorm(
    x: torch.Tensor,  # [T, H]
    weight: torch.Tensor,  # [H]
    eps: float,
    residual: torch.Tensor | None = None,  # [T, H]
) -> tuple[torch.Tensor, torch.Tensor]:  # (out, new_residual)
    """Hugging Face LlamaRMSNorm after an optional residual add (rounded to x's dtype)."""
    new_residual = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    h = new_residual.float()
    normed = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (normed.float() * weight.float()).to(x.dtype), new_residual


def rotary_embedding(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D]
    positions: torch.Tensor,  # [T]
    cos_cache: torch.Tensor,  # [max_position, R/2]
    sin_cache: torch.Tensor,  # [max_position, R/2]
    inplace: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox / rotate_half rotary embedding on the first R dims of every head."""
    half = cos_cache.shape[-1]
    cos = cos_cache[positions.long()].float()[:, None, :]  # [T, 1, R/2]
    sin = sin_cache[positions.long()].float()[:, None, :]
    results = []
    for x in (q, k):
        x1, x2 = x[..., :half].float(), x[..., half : 2 * half].float()
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
        target = x if inplace else x.clone()
        target[..., : 2 * half] = rotated
        results.append(target)
    return results[0], results[1]


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [T, 2I] -> [T, I]
    inter_size = x.shape[-1] // 2
    gate, up = x[..., :inter_size].float(), x[..., inter_size:].float()
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  silu_mul: bool = False) -> torch.Tensor:
    """x @ weight^T (+ bias) in fp32, rounded once; with silu_mul, silu(gate) * up of the rounded halves."""
    y = x.float() @ weight.float().T
    if bias is not None:
        y = y + bias.float()
    y = y.to(x.dtype)
    return silu_and_mul(y) if silu_mul else y

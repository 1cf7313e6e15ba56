"""Torch references of the fused MoE kernels, for tests and the GPU check.

`moe_align_block_size_torch`: the alignment of `moe_align.moe_align_block_size` from ~15 torch ops
(scatter_add counts, cumsum, stable sort, scatter; static shapes, no host sync). Same outputs.

`moe_route_reference`: the router of the MoE models (softmax in fp32 -> top-k -> optional
renormalisation), what `moe_routing.moe_route` fuses.

`fused_moe_reference`: `fused_moe.fused_moe` (same signature). Data flow: flat (token, slot)
rows [T*k] -> for each local expert e, the rows routed to it (found with nonzero: host sync,
reference only) -> x rows @ w13[e]^T -> silu(gate) * up -> @ w2[e]^T -> times the routing
weight -> rows [T*k, H] -> sum over the k slots -> [T, H].
Computes in `compute_dtype` (fp32 by default: the accuracy yardstick; the input dtype gives
the per-expert loop baseline) and returns x's dtype. Other ranks' experts contribute zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from shardserve.workers.kernels.moe_align import padded_length


def moe_align_block_size_torch(topk_ids: torch.Tensor, block_m: int, local_expert_start: int, num_local: int
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted_token_ids [L] int32, expert_ids [L / block_m] int32, num_tokens_post_padded [1] int32).

    topk_ids [T, k]: global expert ids. Static shapes and no host sync (graph-capturable).
    """
    device = topk_ids.device
    num_rows = topk_ids.numel()
    length = padded_length(num_rows, num_local, block_m)
    local = topk_ids.reshape(-1).long() - local_expert_start  # [N]
    bucket = torch.where((local >= 0) & (local < num_local), local, num_local)  # [N]; num_local: not ours
    counts = torch.zeros(num_local + 1, dtype=torch.long, device=device)
    counts.scatter_add_(0, bucket, torch.ones_like(bucket))  # [E + 1], static size (unlike bincount)
    padded = (counts[:num_local] + block_m - 1) // block_m * block_m  # [E]
    ends = padded.cumsum(0)  # [E] inclusive end of each expert's group
    starts = torch.cat([ends - padded, ends.new_full((1,), length)])  # [E + 1]; not-ours -> dump slot
    order = torch.sort(bucket, stable=True).indices  # [N] rows grouped by expert, row order kept
    sorted_bucket = bucket[order]
    first_sorted = counts.cumsum(0) - counts  # [E + 1] first position of each bucket in `order`
    rank = torch.arange(num_rows, device=device) - first_sorted[sorted_bucket]  # [N] index within its group
    dest = torch.where(sorted_bucket < num_local, starts[sorted_bucket] + rank, length)  # [N]
    sorted_ids = torch.full((length + 1,), num_rows, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))  # the extra last slot collects not-ours rows
    block_first = torch.arange(0, length, block_m, device=device)  # [L / block_m]
    expert_ids = torch.bucketize(block_first, ends, right=True)  # [L / block_m], E past the end
    expert_ids = torch.where(expert_ids < num_local, expert_ids, -1).to(torch.int32)
    return sorted_ids[:length], expert_ids, ends[-1:].to(torch.int32)


def moe_route_reference(router_logits: torch.Tensor, top_k: int, renormalize: bool,
                        out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_weights [T, k] in out_dtype (default fp32), topk_ids [T, k] int64) from logits [T, E]."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(out_dtype or torch.float32), ids


def fused_moe_reference(
    x: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2I, H]
    w2: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, k]
    topk_ids: torch.Tensor,  # [T, k] global expert ids
    local_expert_start: int = 0,
    num_local: int | None = None,
    compute_dtype: torch.dtype | None = torch.float32,
) -> torch.Tensor:  # [T, H]
    num_local = w13.shape[0] if num_local is None else num_local
    dtype = compute_dtype or x.dtype
    num_tokens, top_k = topk_ids.shape
    local_ids = topk_ids.reshape(-1) - local_expert_start  # [T*k]
    weights = topk_weights.reshape(-1).to(dtype)  # [T*k]
    rows = torch.zeros(num_tokens * top_k, x.shape[1], dtype=dtype, device=x.device)  # [T*k, H]
    for e in range(num_local):
        idx = (local_ids == e).nonzero().squeeze(1)  # [n] rows routed to local expert e
        if idx.numel() == 0:
            continue
        h = F.linear(x.index_select(0, idx // top_k).to(dtype), w13[e].to(dtype))  # [n, 2I]
        gate, up = h.chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[e].to(dtype))  # [n, H]
        rows[idx] = y * weights[idx, None]
    return rows.view(num_tokens, top_k, -1).sum(1).to(x.dtype)

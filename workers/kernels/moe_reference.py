"""Torch reference of `fused_moe.fused_moe` (same signature), for tests and the GPU check.

Data flow: flat (token, slot) rows [T*k] -> for each local expert e, the rows routed to it
(found with nonzero: host sync, reference only) -> x rows @ w13[e]^T -> silu(gate) * up ->
@ w2[e]^T -> times the routing weight -> rows [T*k, H] -> sum over the k slots -> [T, H].
Computes in `compute_dtype` (fp32 by default: the accuracy yardstick; the input dtype gives
the per-expert loop baseline) and returns x's dtype. Other ranks' experts contribute zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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

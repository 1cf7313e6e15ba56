"""Reference attention over the paged KV cache in plain torch: one masked SDPA call per layer.

Data flow of one call: this step's k/v rows are scattered into the cache at `slot_mapping`.
Then each request's whole context is gathered through its block table into a padded tensor
`[num_requests, max_seq_len, num_kv_heads, head_dim]`, and this step's queries into a padded
`[num_requests, max_query_len, num_heads, head_dim]`. Query j of request i sits at position
`seq_len_i - query_len_i + j`; it may see key positions `<=` its own, which also excludes the
padding past `seq_len_i`. One `scaled_dot_product_attention` (GQA through `enable_gqa`) runs
on the whole batch, and the valid query rows are packed back to `[num_tokens, num_heads,
head_dim]` in the batch's token order. Padding rows of the gathered K/V are zeroed, so stale
cache contents (even NaN) never reach the result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from shardserve.workers.attention.metadata import AttentionMetadata


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store this step's K/V rows: k, v [num_tokens, num_kv_heads, head_dim] at flat slots."""
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    flat = kv_cache.view(2, num_blocks * block_size, num_kv_heads, head_dim)  # [2, num_slots, kv_heads, head_dim]
    flat[0].index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, v.to(kv_cache.dtype))


class TorchAttentionBackend:
    name = "torch"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                metadata: AttentionMetadata, scale: float, kv_written: bool = False) -> torch.Tensor:
        num_tokens, num_heads, head_dim = q.shape
        _, num_blocks, block_size, num_kv_heads, _ = kv_cache.shape
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        if not kv_written:
            write_kv_cache(k, v, kv_cache, metadata.slot_mapping)

        device = q.device
        max_q, max_s = metadata.max_query_len, metadata.max_seq_len
        seq_lens = metadata.seq_lens.to(torch.int64)  # [R]
        starts = metadata.query_start_loc.to(torch.int64)  # [R + 1]
        query_lens = starts[1:] - starts[:-1]  # [R]

        # Gather each request's context through its block table.
        kv_pos = torch.arange(max_s, device=device)  # [S]
        num_ctx_blocks = (max_s + block_size - 1) // block_size
        blocks = metadata.block_tables[:, :num_ctx_blocks].to(torch.int64)  # [R, ctx_blocks]
        slots = blocks[:, kv_pos // block_size] * block_size + kv_pos % block_size  # [R, S]
        kv_valid = kv_pos[None, :] < seq_lens[:, None]  # [R, S]
        slots = torch.where(kv_valid, slots, 0)
        flat = kv_cache.view(2, num_blocks * block_size, num_kv_heads, head_dim)
        keep = kv_valid[:, :, None, None]
        key = torch.where(keep, flat[0][slots], 0).to(q.dtype)  # [R, S, kv_heads, head_dim]
        value = torch.where(keep, flat[1][slots], 0).to(q.dtype)  # [R, S, kv_heads, head_dim]

        # Pad this step's queries per request.
        q_off = torch.arange(max_q, device=device)  # [Q]
        q_valid = q_off[None, :] < query_lens[:, None]  # [R, Q]
        q_index = torch.where(q_valid, starts[:-1, None] + q_off[None, :], 0)  # [R, Q]
        query = q[q_index]  # [R, Q, num_heads, head_dim]
        q_pos = (seq_lens - query_lens)[:, None] + q_off[None, :]  # [R, Q]
        mask = kv_pos[None, None, :] <= q_pos[:, :, None]  # [R, Q, S]; padding rows see the whole context

        out = F.scaled_dot_product_attention(
            query.transpose(1, 2),  # [R, num_heads, Q, head_dim]
            key.transpose(1, 2),  # [R, kv_heads, S, head_dim]
            value.transpose(1, 2),
            attn_mask=mask[:, None],  # [R, 1, Q, S]
            scale=scale,
            enable_gqa=num_heads != num_kv_heads,
        )  # [R, num_heads, Q, head_dim]
        # Pack valid rows back in token order; tokens no request owns (runner padding) stay 0.
        result = torch.zeros_like(q)  # [num_tokens, num_heads, head_dim]
        result[q_index[q_valid]] = out.transpose(1, 2)[q_valid].to(q.dtype)
        return result

"""Attention over the paged KV cache with the Triton kernels of `shardserve.workers.kernels`.

Data flow of one call: this step's k/v rows `[T, Hkv, D]` are scattered into the layer's
cache at `metadata.slot_mapping` (`kv_cache_write`). Then, when every request contributes
exactly one token (`max_query_len == 1` and one token per request), the split-K
`paged_decode_attention` kernel runs with `q [T, Hq, D]` as a `[B, Hq, D]` batch; otherwise
`extend_attention` runs over the flattened batch, which covers prefill, prefix-cache hits,
chunked prefill and decode rows mixed in; its work list is built once per step (first layer)
and kept in `metadata.backend_cache`. Both read each request's whole context — cached
prefix plus this step's tokens — from the cache through `metadata.block_tables` and return
`[T, Hq, D]` in q's dtype. Implements the `AttentionBackend` protocol of backend.py.
"""

from __future__ import annotations

import torch
from shardserve.workers.attention.metadata import AttentionMetadata
from shardserve.workers.kernels.extend_attention import extend_attention, extend_block_q, extend_work_items
from shardserve.workers.kernels.kv_cache_write import kv_cache_write
from shardserve.workers.kernels.paged_decode_attention import paged_decode_attention


class TritonAttentionBackend:
    name = "triton"

    def forward(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
        metadata: AttentionMetadata,
        scale: float,
        kv_written: bool = False,  # k/v already in the cache (the fused rotary + KV write kernel)
    ) -> torch.Tensor:  # [T, Hq, D]
        num_tokens, num_heads, _ = q.shape
        num_kv_heads = kv_cache.shape[3]
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        if not kv_written:
            kv_cache_write(k, v, kv_cache, metadata.slot_mapping)
        if metadata.max_query_len == 1 and num_tokens == metadata.seq_lens.shape[0]:
            return paged_decode_attention(
                q, kv_cache, metadata.block_tables, metadata.seq_lens, scale, max_seq_len=metadata.max_seq_len
            )
        work = metadata.backend_cache.get("extend_work")
        if work is None:
            block_q = extend_block_q(num_heads, num_kv_heads, q.is_cuda)
            work = metadata.backend_cache["extend_work"] = extend_work_items(
                metadata.query_start_loc, num_tokens, block_q)
        return extend_attention(
            q, kv_cache, metadata.block_tables, metadata.query_start_loc, metadata.seq_lens, scale, work
        )

"""Test helper: a random paged KV cache whose requests own shuffled, non-contiguous blocks.

`make_paged_cache` fills the whole cache with random values (so reading a wrong block or
offset changes the result), deals out a random permutation of block ids to the requests and
returns `block_tables [R, max_blocks + 1]` padded with 0, as the model runner pads them.
"""

from __future__ import annotations

import torch


def make_paged_cache(
    seq_lens: list[int], num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:  # kv_cache [2, num_blocks, block_size, Hkv, D], block_tables int32
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3  # spare blocks hold garbage nobody should read
    kv_cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim).to(dtype=dtype, device=device)
    ids = torch.randperm(num_blocks).tolist()
    block_tables = torch.zeros(len(seq_lens), max(blocks_per_seq) + 1, dtype=torch.int32)
    for i, n in enumerate(blocks_per_seq):
        block_tables[i, :n] = torch.tensor(ids[:n], dtype=torch.int32)
        ids = ids[n:]
    return kv_cache, block_tables.to(device)


def naive_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
) -> torch.Tensor:  # q [M, Hq, D], keys/values [N, Hkv, D] -> [M, Hq, D] fp32
    """Per-request softmax attention, causal with the queries at the last M positions of N."""
    num_q, num_q_heads, _ = q.shape
    num_k, num_kv_heads, _ = keys.shape
    out = torch.empty(num_q, num_q_heads, q.shape[-1], dtype=torch.float32, device=q.device)
    for h in range(num_q_heads):
        kv_h = h // (num_q_heads // num_kv_heads)
        for j in range(num_q):
            visible = num_k - num_q + j + 1  # keys at positions 0 .. pos(j)
            scores = (keys[:visible, kv_h].float() @ q[j, h].float()) * scale  # [visible]
            out[j, h] = scores.softmax(0) @ values[:visible, kv_h].float()
    return out

"""The torch attention backend against a per-request loop of plain softmax attention."""

from __future__ import annotations

import math

import pytest
import torch
from paged_helper import build_metadata
from shardserve.workers.attention.backend import get_attention_backend


def _naive(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], query_lens: list[int],
           scale: float) -> torch.Tensor:
    """Per request: queries at the last query_len positions of its context attend causally."""
    outs, start = [], 0
    for k, v, n in zip(keys, values, query_lens, strict=True):
        seq_len, num_kv_heads = k.shape[0], k.shape[1]
        qi = q[start:start + n]  # [n, heads, dim]
        group = qi.shape[1] // num_kv_heads
        k_rep, v_rep = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", qi, k_rep) * scale  # [heads, n, seq_len]
        q_pos = torch.arange(seq_len - n, seq_len)[:, None]
        scores = scores.masked_fill(torch.arange(seq_len)[None, :] > q_pos, -math.inf)
        outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v_rep))
        start += n
    return torch.cat(outs)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2)])
def test_mixed_batch_matches_naive(num_heads: int, num_kv_heads: int) -> None:
    torch.manual_seed(0)
    head_dim, block_size, num_blocks = 8, 4, 32
    # (cached, new): two decodes, a prefill chunk over a cached prefix, a fresh prompt.
    shapes = [(9, 1), (2, 1), (5, 7), (0, 6)]
    cache = torch.full((2, num_blocks, block_size, num_kv_heads, head_dim), float("nan"))
    free = list(range(num_blocks - 1, 0, -1))
    chunks, keys, values = [], [], []
    for cached, new in shapes:
        seq_len = cached + new
        blocks = [free.pop() for _ in range(-(-seq_len // block_size))][::-1]  # non-contiguous order
        k, v = torch.randn(seq_len, num_kv_heads, head_dim), torch.randn(seq_len, num_kv_heads, head_dim)
        for pos in range(cached):  # the prefix is already in the cache
            cache[0, blocks[pos // block_size], pos % block_size] = k[pos]
            cache[1, blocks[pos // block_size], pos % block_size] = v[pos]
        chunks.append((cached, new, blocks))
        keys.append(k)
        values.append(v)
    metadata = build_metadata(chunks, block_size, torch.device("cpu"))
    q = torch.randn(metadata.num_tokens, num_heads, head_dim)
    new_k = torch.cat([k[c:] for k, (c, _) in zip(keys, shapes, strict=True)])
    new_v = torch.cat([v[c:] for v, (c, _) in zip(values, shapes, strict=True)])
    scale = head_dim**-0.5

    out = get_attention_backend("torch").forward(q, new_k, new_v, cache, metadata, scale)

    assert out.shape == (metadata.num_tokens, num_heads, head_dim)
    torch.testing.assert_close(out, _naive(q, keys, values, [n for _, n in shapes], scale), atol=1e-5, rtol=1e-5)
    # This step's K/V now sit in the cache at slot_mapping.
    flat_k = cache[0].reshape(-1, num_kv_heads, head_dim)
    torch.testing.assert_close(flat_k[metadata.slot_mapping], new_k)


def test_unknown_backend_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        get_attention_backend("flash")

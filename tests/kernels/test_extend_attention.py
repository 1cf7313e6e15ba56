"""Extend / prefill attention over the paged cache vs its torch reference (and the naive formula)."""

from __future__ import annotations

import pytest
import torch
from _paged import make_paged_cache, naive_attention
from kernel_env import ATOL, ATTENTION_DTYPES
from shardserve.workers.kernels import reference
from shardserve.workers.kernels.extend_attention import extend_attention

# (cached prefix, query len) per request: plain prefill, prefix hit with a short query,
# decode rows, block-boundary lengths, a chunk spanning several 32-row query tiles.
MIXED = [(0, 37), (100, 5), (47, 1), (16, 16), (0, 1), (64, 70), (13, 3)]


def _run(requests, num_q_heads, num_kv_heads, head_dim, block_size, dtype, device):
    seq_lens = [p + n for p, n in requests]
    query_lens = [n for _, n in requests]
    kv_cache, block_tables = make_paged_cache(seq_lens, num_kv_heads, head_dim, block_size, dtype, device)
    q = torch.randn(sum(query_lens), num_q_heads, head_dim).to(dtype=dtype, device=device)
    starts = torch.tensor([0] + query_lens, dtype=torch.int32).cumsum(0).to(torch.int32).to(device)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    scale = head_dim**-0.5
    out = extend_attention(q, kv_cache, block_tables, starts, lens, scale, max(query_lens))
    ref = reference.extend_attention(q, kv_cache, block_tables, starts, lens, scale, max(query_lens))
    return out, ref, (q, kv_cache, block_tables, starts)


@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(2, 2), (8, 2), (8, 1)])  # GQA 1, 4, 8
def test_extend_mixed_batch_matches_reference(device, num_q_heads, num_kv_heads):
    out, ref, _ = _run(MIXED, num_q_heads, num_kv_heads, 32, 16, torch.float32, device)
    torch.testing.assert_close(out, ref, atol=ATOL[torch.float32], rtol=0)


@pytest.mark.parametrize("head_dim,block_size", [(64, 16), (16, 4)])
def test_extend_head_dims_and_block_sizes(device, head_dim, block_size):
    out, ref, _ = _run([(0, 33), (200, 7), (31, 1)], 4, 2, head_dim, block_size, torch.float32, device)
    torch.testing.assert_close(out, ref, atol=ATOL[torch.float32], rtol=0)


@pytest.mark.parametrize("dtype", ATTENTION_DTYPES)
def test_extend_dtypes(device, dtype):
    out, ref, _ = _run([(0, 20), (45, 12), (9, 1)], 4, 1, 64, 16, dtype, device)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=ATOL[dtype], rtol=0)


def test_extend_chunked_prefill_equals_one_shot_prefill(device):
    # The last 24 tokens as a chunk over a 40-token cached prefix must equal the same rows of a
    # one-shot 64-token prefill over the same cache: the prefix is read from the cache either way.
    chunk, _, (q_chunk, kv_cache, block_tables, _) = _run([(40, 24)], 4, 2, 32, 16, torch.float32, device)
    q_full = torch.cat([torch.randn(40, 4, 32, device=device), q_chunk])
    full = extend_attention(q_full, kv_cache, block_tables, torch.tensor([0, 64], dtype=torch.int32, device=device),
                            torch.tensor([64], dtype=torch.int32, device=device), 32**-0.5, 64)
    torch.testing.assert_close(chunk, full[40:], atol=ATOL[torch.float32], rtol=0)


def test_extend_matches_naive_attention(device):
    requests = [(20, 6), (0, 9)]
    out, _, (q, kv_cache, block_tables, starts) = _run(requests, 4, 2, 16, 8, torch.float32, device)
    for i, (prefix, n) in enumerate(requests):
        toks = torch.arange(prefix + n, device=device)
        pages = block_tables[i].long()[toks // 8]
        keys, values = kv_cache[0, pages, toks % 8], kv_cache[1, pages, toks % 8]
        lo = int(starts[i])
        expected = naive_attention(q[lo : lo + n], keys, values, 16**-0.5)
        torch.testing.assert_close(out[lo : lo + n], expected, atol=ATOL[torch.float32], rtol=0)


def test_extend_rejects_mismatched_query_start_loc(device):
    kv_cache = torch.zeros(2, 4, 16, 2, 32, device=device)
    with pytest.raises(ValueError, match="query_start_loc"):
        extend_attention(torch.zeros(3, 2, 32, device=device), kv_cache,
                         torch.zeros(2, 1, dtype=torch.int32, device=device),
                         torch.tensor([0, 3], dtype=torch.int32, device=device),
                         torch.tensor([3, 1], dtype=torch.int32, device=device), 1.0, 3)

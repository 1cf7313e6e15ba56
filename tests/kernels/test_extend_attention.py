"""Extend / prefill attention over the paged cache vs its torch reference (and the naive formula)."""

from __future__ import annotations

import pytest
import torch
from _paged import make_paged_cache, naive_attention
from kernel_env import ATOL, ATTENTION_DTYPES
from shardserve.workers.kernels import reference
from shardserve.workers.kernels.extend_attention import extend_attention, extend_work_items

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
    out = extend_attention(q, kv_cache, block_tables, starts, lens, scale)
    ref = reference.extend_attention(q, kv_cache, block_tables, starts, lens, scale)
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
                            torch.tensor([64], dtype=torch.int32, device=device), 32**-0.5)
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
                         torch.tensor([3, 1], dtype=torch.int32, device=device), 1.0)


def test_extend_non_power_of_two_group(device):
    # 6 query heads over 2 KV heads: the group of 3 is padded to 4 rows per token in the tile.
    out, ref, _ = _run(MIXED, 6, 2, 32, 16, torch.float32, device)
    torch.testing.assert_close(out, ref, atol=ATOL[torch.float32], rtol=0)


def test_work_items_cover_every_query_block_once():
    # query lens 5, 0, 1, 9 with 4-token blocks: 2 + 0 + 1 + 3 = 6 items, then idle ones (request R).
    starts = torch.tensor([0, 5, 5, 6, 15], dtype=torch.int32)
    work = extend_work_items(starts, num_tokens=15, block_q=4)
    assert work.shape == (2, 4 + 4)  # ceil(15 / 4) + min(R, T)
    assert work[:, :6].tolist() == [[0, 0, 2, 3, 3, 3], [0, 1, 0, 0, 1, 2]]
    assert work[0, 6:].tolist() == [4, 4]


def test_extend_padded_like_a_cuda_graph(device):
    # A graph captured for 64 tokens and 8 request slots replays a step with fewer of both:
    # padded requests have query_len 0 and seq_len 0, padded tokens belong to nobody.
    requests = [(30, 9), (12, 1), (0, 20)]
    out, ref, (q, kv_cache, block_tables, starts) = _run(requests, 8, 2, 32, 16, torch.float32, device)
    num_tokens = q.shape[0]
    q_pad = torch.cat([q, torch.randn(64 - num_tokens, *q.shape[1:], device=device)])
    starts_pad = torch.cat([starts, starts[-1:].expand(5)])
    lens_pad = torch.tensor([p + n for p, n in requests] + [0] * 5, dtype=torch.int32, device=device)
    tables_pad = torch.cat([block_tables, torch.zeros(5, block_tables.shape[1], dtype=block_tables.dtype,
                                                      device=device)])
    padded = extend_attention(q_pad, kv_cache, tables_pad, starts_pad, lens_pad, 32**-0.5)
    torch.testing.assert_close(padded[:num_tokens], ref, atol=ATOL[torch.float32], rtol=0)
    assert torch.count_nonzero(padded[num_tokens:]) == 0

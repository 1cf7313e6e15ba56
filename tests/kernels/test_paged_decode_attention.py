"""Split-K paged decode attention kernel vs its torch reference (and the naive formula)."""

from __future__ import annotations

import pytest
import torch
from _paged import make_paged_cache, naive_attention
from kernel_env import ATOL, ATTENTION_DTYPES
from shardserve.workers.kernels import reference
from shardserve.workers.kernels.paged_decode_attention import choose_num_splits, paged_decode_attention

# Odd lengths, lengths exactly at block (16) and tile (64) boundaries, and one just past them.
SEQ_LENS = [1, 15, 16, 17, 64, 65, 100, 128, 203]


def _run(seq_lens, num_q_heads, num_kv_heads, head_dim, block_size, dtype, device, num_splits):
    kv_cache, block_tables = make_paged_cache(seq_lens, num_kv_heads, head_dim, block_size, dtype, device)
    q = torch.randn(len(seq_lens), num_q_heads, head_dim).to(dtype=dtype, device=device)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    scale = head_dim**-0.5
    out = paged_decode_attention(q, kv_cache, block_tables, lens, scale, max_seq_len=max(seq_lens),
                                 num_splits=num_splits)
    ref = reference.paged_decode_attention(q, kv_cache, block_tables, lens, scale)
    return out, ref, (q, kv_cache, block_tables)


@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(4, 4), (8, 2), (8, 1)])  # GQA 1, 4, 8
@pytest.mark.parametrize("num_splits", [1, 3, None])
def test_decode_matches_reference_gqa_and_splits(device, num_q_heads, num_kv_heads, num_splits):
    out, ref, _ = _run(SEQ_LENS, num_q_heads, num_kv_heads, 32, 16, torch.float32, device, num_splits)
    torch.testing.assert_close(out, ref, atol=ATOL[torch.float32], rtol=0)


@pytest.mark.parametrize("head_dim,block_size", [(64, 16), (16, 8), (32, 32)])
def test_decode_head_dims_and_block_sizes(device, head_dim, block_size):
    out, ref, _ = _run([3, 32, 33, 97], 8, 2, head_dim, block_size, torch.float32, device, 2)
    torch.testing.assert_close(out, ref, atol=ATOL[torch.float32], rtol=0)


@pytest.mark.parametrize("dtype", ATTENTION_DTYPES)
def test_decode_dtypes(device, dtype):
    out, ref, _ = _run([5, 16, 77, 130], 8, 2, 64, 16, dtype, device, 3)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=ATOL[dtype], rtol=0)


def test_decode_more_splits_than_tiles_and_empty_request(device):
    # 9 splits over at most 2 tiles leaves most splits empty; seq_len 0 (a padded row) yields zeros.
    seq_lens = [0, 2, 70, 16]
    out, ref, _ = _run(seq_lens, 4, 2, 32, 16, torch.float32, device, 9)
    torch.testing.assert_close(out, ref, atol=ATOL[torch.float32], rtol=0)
    assert torch.count_nonzero(out[0]) == 0 and torch.count_nonzero(out[1:]) > 0


def test_reference_matches_naive_attention(device):
    seq_lens = [17, 40]
    out, ref, (q, kv_cache, block_tables) = _run(seq_lens, 8, 2, 32, 16, torch.float32, device, 2)
    for b, n in enumerate(seq_lens):
        toks = torch.arange(n, device=device)
        pages = block_tables[b].long()[toks // 16]
        keys, values = kv_cache[0, pages, toks % 16], kv_cache[1, pages, toks % 16]
        expected = naive_attention(q[b : b + 1], keys, values, 32**-0.5)[0]
        torch.testing.assert_close(out[b], expected, atol=ATOL[torch.float32], rtol=0)
        torch.testing.assert_close(ref[b], expected, atol=1e-5, rtol=0)


def test_choose_num_splits_fills_device_and_bounds_split_length():
    assert choose_num_splits(batch_size=1, num_kv_heads=8, max_seq_len=4096) == 32  # 4096 / 128 tokens
    assert choose_num_splits(batch_size=1, num_kv_heads=8, max_seq_len=300) == 3
    assert choose_num_splits(batch_size=64, num_kv_heads=8, max_seq_len=4096) == 1
    assert choose_num_splits(batch_size=4, num_kv_heads=8, max_seq_len=100_000) == 9  # cdiv(264, 32)


def test_decode_rejects_bad_shapes(device):
    kv_cache = torch.zeros(2, 4, 16, 3, 32, device=device)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        paged_decode_attention(torch.zeros(1, 4, 32, device=device), kv_cache,
                               torch.zeros(1, 1, dtype=torch.int32, device=device),
                               torch.ones(1, dtype=torch.int32, device=device), 1.0)

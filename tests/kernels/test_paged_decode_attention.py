"""Split-K paged decode attention kernel vs its torch reference (and the naive formula)."""

from __future__ import annotations

import pytest
import torch
from _paged import make_paged_cache, naive_attention
from compiled_ptx import compile_ptx, memory_ops
from kernel_env import ATOL, ATTENTION_DTYPES
from shardserve.workers.kernels import paged_decode_attention as pda
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


@pytest.mark.parametrize("num_q_heads,num_kv_heads,num_splits", [(8, 2, 3), (4, 4, 9), (8, 1, 64)])
def test_merge_in_stage_1_equals_the_separate_merge(device, monkeypatch, num_q_heads, num_kv_heads, num_splits):
    # the last split program of each (request, kv head) merges: the same arithmetic as stage 2, so
    # the same bits; twice in a row (the counters are back to zero after each launch)
    seq_lens = [0, 1, 70, 203, 16]  # an empty request, more splits than tiles, several tiles per split
    kv_cache, block_tables = make_paged_cache(seq_lens, num_kv_heads, 32, 16, torch.float32, device)
    q = torch.randn(len(seq_lens), num_q_heads, 32, device=device)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)

    def run():
        return paged_decode_attention(q, kv_cache, block_tables, lens, 32**-0.5, num_splits=num_splits)

    separate = run()
    monkeypatch.setattr(pda, "FUSED_MERGE", True)
    monkeypatch.setattr(pda, "_COUNTERS", {})  # only a fused launch allocates counters
    fused, again = run(), run()
    assert torch.equal(fused, separate) and torch.equal(again, separate)
    assert torch.count_nonzero(pda._COUNTERS[q.device]) == 0  # the fused path ran and left them zeroed
    torch.testing.assert_close(fused, reference.paged_decode_attention(q, kv_cache, block_tables, lens, 32**-0.5),
                               atol=ATOL[torch.float32], rtol=0)


def test_more_pairs_than_counters_merge_in_stage_2(device, monkeypatch):
    monkeypatch.setattr(pda, "FUSED_MERGE", True)
    monkeypatch.setattr(pda, "MAX_MERGE_COUNTERS", 3)  # 2 requests x 2 kv heads = 4 pairs > 3
    out, ref, _ = _run([40, 90], 8, 2, 32, 16, torch.float32, device, 4)
    torch.testing.assert_close(out, ref, atol=ATOL[torch.float32], rtol=0)


def test_fused_merge_compiles_to_an_acq_rel_counter_and_l2_reads():
    # sm_90 PTX of stage 1 with the merge: one gpu-scope acquire-release add on the counter, and
    # the partials read back with .cg (L2: another SM wrote them, this SM's L1 may be stale)
    pointers = {n: "*fp32" for n in ("q_ptr", "part_out_ptr", "part_lse_ptr", "out_ptr")}
    pointers.update(cache_ptr="*bf16", q_ptr="*bf16", out_ptr="*bf16", block_tables_ptr="*i32",
                    seq_lens_ptr="*i32", counters_ptr="*i32")
    constexprs = {"GROUP": 4, "GROUP_PAD": 16, "HEAD_DIM": 128, "BLOCK_SIZE": 16, "BLOCK_N": 64, "IEEE": False,
                  "DIRECT": False, "FUSED_MERGE": True, "SPLITS_PAD": 64}
    ops = memory_ops(compile_ptx(pda.__name__, "_decode_stage1", pointers=pointers, constexprs=constexprs,
                                 floats={"qk_scale"}))
    assert [op for op in ops if op.startswith("atom")] == ["atom.global.gpu.acq_rel.add.u32"], ops
    assert any(op.startswith("ld.global.cg") for op in ops), ops


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

"""TritonAttentionBackend.forward vs per-request softmax attention written out in the test.

Each request's full K/V history is kept here, outside the cache: the cached prefix is placed in
shuffled blocks beforehand, this step's rows go through `forward` (which must write them), and
every slot no request owns holds NaN, so any stray read shows up in the result.
"""

from __future__ import annotations

import pytest
import torch
from _paged import naive_attention
from kernel_env import ATOL
from shardserve.workers.attention import triton_backend
from shardserve.workers.attention.metadata import AttentionMetadata
from shardserve.workers.attention.triton_backend import TritonAttentionBackend
from shardserve.workers.runner.persistent_batch import PersistentBatch
from shardserve.workers.runner.verify_decode import decode_rows, eager_metadata, is_verify_decode
from shardserve.workers.step_types import ScheduledRequest

BLOCK_SIZE, HEAD_DIM = 16, 32


def _step(requests, num_q_heads, num_kv_heads, device):
    """(cache, metadata, q, k, v, history) for one step of requests given as (prefix_len, query_len)."""
    seq_lens = [p + n for p, n in requests]
    blocks_per_seq = [-(-s // BLOCK_SIZE) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + 2
    cache = torch.full((2, num_blocks, BLOCK_SIZE, num_kv_heads, HEAD_DIM), float("nan"), device=device)
    ids = torch.randperm(num_blocks).tolist()
    block_tables = torch.zeros(len(requests), max(blocks_per_seq), dtype=torch.int32)
    history, slots = [], []
    for i, ((prefix, n), nb) in enumerate(zip(requests, blocks_per_seq, strict=True)):
        block_tables[i, :nb] = torch.tensor(ids[:nb], dtype=torch.int32)
        ids = ids[nb:]
        kv = torch.randn(2, prefix + n, num_kv_heads, HEAD_DIM, device=device)  # K, V of positions 0..seq_len-1
        pos = torch.arange(prefix + n)
        slot = block_tables[i].long()[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
        flat = cache.view(2, num_blocks * BLOCK_SIZE, num_kv_heads, HEAD_DIM)
        flat[:, slot[:prefix].to(device)] = kv[:, :prefix]  # the cached prefix
        history.append(kv)
        slots.append(slot[prefix:])
    query_lens = [n for _, n in requests]
    metadata = AttentionMetadata(
        num_tokens=sum(query_lens), num_requests=len(requests),
        query_start_loc=torch.tensor([0] + query_lens).cumsum(0).to(torch.int32).to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=block_tables.to(device), slot_mapping=torch.cat(slots).to(device),
        max_query_len=max(query_lens), max_seq_len=max(seq_lens),
        query_lens_cpu=query_lens, seq_lens_cpu=seq_lens,
    )
    q = torch.randn(sum(query_lens), num_q_heads, HEAD_DIM, device=device)
    k = torch.cat([kv[0, p:] for kv, (p, _) in zip(history, requests, strict=True)])
    v = torch.cat([kv[1, p:] for kv, (p, _) in zip(history, requests, strict=True)])
    return cache, metadata, q, k, v, history


@pytest.mark.parametrize("requests", [
    [(0, 23), (40, 4), (17, 1), (5, 1), (16, 16)],  # prefill, prefix hit, decode rows, block boundary
    [(31, 1), (0, 1), (64, 1), (100, 1)],  # decode only: the split-K decode kernel
])
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(4, 4), (8, 2)])
def test_backend_forward_matches_naive_attention(device, monkeypatch, requests, num_q_heads, num_kv_heads):
    cache, metadata, q, k, v, history = _step(requests, num_q_heads, num_kv_heads, device)
    scale = HEAD_DIM**-0.5
    calls: list[str] = []
    for name in ("paged_decode_attention", "extend_attention"):
        kernel = getattr(triton_backend, name)
        monkeypatch.setattr(triton_backend, name, lambda *a, _k=kernel, _n=name, **kw: calls.append(_n) or _k(*a, **kw))
    out = TritonAttentionBackend().forward(q, k, v, cache, metadata, scale)
    decode_only = all(n == 1 for _, n in requests)
    assert calls == ["paged_decode_attention" if decode_only else "extend_attention"]
    assert out.shape == q.shape and out.dtype == q.dtype
    assert not torch.isnan(out).any()
    lo = 0
    for (_, n), kv in zip(requests, history, strict=True):
        expected = naive_attention(q[lo : lo + n], kv[0], kv[1], scale)
        torch.testing.assert_close(out[lo : lo + n], expected, atol=ATOL[torch.float32], rtol=0)
        lo += n
    written = metadata.slot_mapping
    flat = cache.view(2, -1, num_kv_heads, HEAD_DIM)
    assert torch.equal(flat[0, written], k) and torch.equal(flat[1, written], v)


def test_verify_step_as_decode_rows_matches_the_extend_path(device, monkeypatch):
    """A verify step (each request's last token + its drafts, a plain decode row beside) run as one
    decode query per token (runner/verify_decode.py: block tables repeated, context = position + 1)
    takes the split-K decode kernel and gives the extend kernel's result: causal within the drafts."""
    requests = [(40, 5), (17, 1), (3, 3)]  # (cached prefix, 1 + drafts)
    cache, metadata, q, k, v, history = _step(requests, 8, 2, device)
    batch = PersistentBatch(4, metadata.block_tables.shape[1], BLOCK_SIZE, device)
    scheduled = []
    for i, (prefix, n) in enumerate(requests):
        batch.add(f"r{i}")
        blocks = tuple(metadata.block_tables[i].tolist()[: -(-(prefix + n) // BLOCK_SIZE)])
        batch.append_blocks(i, blocks)
        scheduled.append(ScheduledRequest(f"r{i}", tuple(range(n)), prefix, blocks, True, num_drafts=n - 1))
    layout = batch.layout(tuple(scheduled))
    assert is_verify_decode(layout)
    assert torch.equal(torch.from_numpy(layout.slot_mapping).to(device), metadata.slot_mapping)
    _, rows = decode_rows(layout)
    block_tables = metadata.block_tables.index_select(0, torch.from_numpy(rows).to(device))
    as_decode = eager_metadata(layout, metadata.slot_mapping, torch.from_numpy(layout.positions).to(device),
                               block_tables)
    scale = HEAD_DIM**-0.5
    calls: list[str] = []
    for name in ("paged_decode_attention", "extend_attention"):
        kernel = getattr(triton_backend, name)
        monkeypatch.setattr(triton_backend, name, lambda *a, _k=kernel, _n=name, **kw: calls.append(_n) or _k(*a, **kw))
    backend = TritonAttentionBackend()
    decoded = backend.forward(q, k, v, cache.clone(), as_decode, scale)
    extended = backend.forward(q, k, v, cache, metadata, scale)
    assert calls == ["paged_decode_attention", "extend_attention"]
    torch.testing.assert_close(decoded, extended, atol=ATOL[torch.float32], rtol=0)
    lo = 0
    for (_, n), kv in zip(requests, history, strict=True):
        expected = naive_attention(q[lo : lo + n], kv[0], kv[1], scale)
        torch.testing.assert_close(decoded[lo : lo + n], expected, atol=ATOL[torch.float32], rtol=0)
        lo += n

"""Sharding of the parallel layers: per-rank weight loaders and outputs recombine to the whole.

Layers are built once per fake TP rank (a ParallelState with a placeholder group: no
torch.distributed is needed to build and load), each rank loads the full checkpoint tensor
through its `weight_loader`, and the per-rank results are combined by hand the way the
collectives would (concatenate column shards, sum row partials).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from shardserve.parallel.embedding import ParallelLMHead, VocabParallelEmbedding
from shardserve.parallel.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from shardserve.parallel.state import GroupInfo, ParallelState, get_parallel_state, set_parallel_state


@contextmanager
def tp_rank(rank: int, size: int) -> Iterator[None]:
    previous = get_parallel_state()
    group = object() if size > 1 else None
    set_parallel_state(ParallelState(tp=GroupInfo(rank=rank, size=size, group=group)))
    try:
        yield
    finally:
        set_parallel_state(previous)


def _load(layer: torch.nn.Module, name: str, weight: torch.Tensor, shard_id: object = None) -> None:
    param = getattr(layer, name)
    param.weight_loader(param, weight, shard_id)


@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_column_and_row_parallel_recombine(tp_size: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 16)
    w_col, b_col = torch.randn(32, 16), torch.randn(32)
    w_row, b_row = torch.randn(16, 32), torch.randn(16)
    col_outs, row_partials = [], []
    for rank in range(tp_size):
        with tp_rank(rank, tp_size):
            col = ColumnParallelLinear(16, 32, bias=True)
            row = RowParallelLinear(32, 16, bias=True)
        _load(col, "weight", w_col)
        _load(col, "bias", b_col)
        _load(row, "weight", w_row)
        _load(row, "bias", b_row)
        y = col(x)  # [5, 32 / tp]
        col_outs.append(y)
        bias = row.bias if rank == 0 else None
        row_partials.append(row.quant_method.apply(row, y, bias))
    full = torch.cat(col_outs, dim=-1)
    torch.testing.assert_close(full, F.linear(x, w_col, b_col))
    torch.testing.assert_close(sum(row_partials), F.linear(full, w_row, b_row), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("tp_size", [1, 2])
def test_merged_gate_up_per_shard_and_fused(tp_size: int) -> None:
    gate, up = torch.randn(24, 8), torch.randn(24, 8)
    for rank in range(tp_size):
        with tp_rank(rank, tp_size):
            per_shard = MergedColumnParallelLinear(8, [24, 24])
            fused = MergedColumnParallelLinear(8, [24, 24])
        _load(per_shard, "weight", gate, 0)
        _load(per_shard, "weight", up, 1)
        _load(fused, "weight", torch.cat([gate, up]))
        n = 24 // tp_size
        expected = torch.cat([gate[rank * n:(rank + 1) * n], up[rank * n:(rank + 1) * n]])
        torch.testing.assert_close(per_shard.weight, expected)
        torch.testing.assert_close(fused.weight, expected)


@pytest.mark.parametrize("tp_size,expected_replicas", [(1, 1), (2, 1), (4, 2)])
def test_qkv_heads_split_and_kv_replication(tp_size: int, expected_replicas: int) -> None:
    head, num_heads, num_kv_heads = 4, 8, 2
    q, k, v = torch.randn(num_heads * head, 16), torch.randn(num_kv_heads * head, 16), torch.randn(num_kv_heads * head, 16)
    for rank in range(tp_size):
        with tp_rank(rank, tp_size):
            layer = QKVParallelLinear(16, head, num_heads, num_kv_heads, bias=True)
        assert layer.num_kv_head_replicas == expected_replicas
        for shard_id, w in (("q", q), ("k", k), ("v", v)):
            _load(layer, "weight", w, shard_id)
            _load(layer, "bias", w[:, 0], shard_id)
        qn, kvn = layer.q_size, layer.kv_size
        kv_rank = rank // expected_replicas
        expected = torch.cat([q[rank * qn:(rank + 1) * qn], k[kv_rank * kvn:(kv_rank + 1) * kvn],
                              v[kv_rank * kvn:(kv_rank + 1) * kvn]])
        torch.testing.assert_close(layer.weight, expected)
        torch.testing.assert_close(layer.bias, expected[:, 0])
    with pytest.raises(ValueError, match="shard_id must be 'q', 'k' or 'v'"):
        _load(layer, "weight", q, "x")


@pytest.mark.parametrize("tp_size", [1, 2])
def test_vocab_parallel_embedding_and_lm_head(tp_size: int) -> None:
    vocab, hidden = 100, 8
    table = torch.randn(vocab, hidden)
    ids = torch.tensor([0, 5, 63, 64, 99])
    h = torch.randn(3, hidden)
    rows, logit_shards = [], []
    for rank in range(tp_size):
        with tp_rank(rank, tp_size):
            emb = VocabParallelEmbedding(vocab, hidden, padding_multiple=64)
            head = ParallelLMHead(vocab, hidden, padding_multiple=64)
        assert emb.num_embeddings_padded == 64 * tp_size * ((vocab + 64 * tp_size - 1) // (64 * tp_size))
        _load(emb, "weight", table)
        head.tie_to(emb)
        assert head.weight is emb.weight
        local = torch.where((ids >= emb.vocab_start) & (ids < emb.vocab_end), ids - emb.vocab_start, 0)
        in_range = ((ids >= emb.vocab_start) & (ids < emb.vocab_end)).float()[:, None]
        rows.append(F.embedding(local, emb.weight) * in_range)
        logit_shards.append(F.linear(h, head.weight))
    torch.testing.assert_close(sum(rows), table[ids])
    logits = torch.cat(logit_shards, dim=-1)
    assert torch.all(logits[:, vocab:] == 0)  # padding rows are zero
    torch.testing.assert_close(logits[:, :vocab], h @ table.T)
    if tp_size == 1:  # the module's own forward at size 1: logits without padding, the weight's dtype
        out = head(h)
        assert out.shape == (3, vocab) and out.dtype == torch.float32
        head16 = ParallelLMHead(vocab, hidden, params_dtype=torch.bfloat16)
        _load(head16, "weight", table)
        assert head16(h.bfloat16()).dtype == torch.bfloat16  # widened by its consumers, not here
        torch.testing.assert_close(emb(ids), table[ids])


def test_replicated_linear_and_bad_sizes() -> None:
    layer = ReplicatedLinear(8, 3)
    w = torch.randn(3, 8)
    _load(layer, "weight", w)
    torch.testing.assert_close(layer.weight, w)
    with pytest.raises(ValueError, match=r"does not fit"):
        _load(layer, "weight", torch.randn(4, 8))
    with tp_rank(0, 3), pytest.raises(ValueError, match="not divisible by tensor-parallel size 3"):
        ColumnParallelLinear(8, 32)

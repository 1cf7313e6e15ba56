"""The mixed-step graph's padded forward equals the unpadded eager forward (CPU, Triton interpreter).

`MixedGraphs._forward` is exactly what a CUDA graph captures; on CPU it runs eagerly through the
same Triton kernels (interpreted), so the padding scheme — tokens past the step's last one,
request slots with query length 0, block tables gathered by persistent row — is checked here
without a GPU: a real step's rows must come out as if the step had run unpadded.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from shardserve.workers.attention.backend import get_attention_backend
from shardserve.workers.attention.metadata import AttentionMetadata
from shardserve.workers.config import ModelConfig
from shardserve.workers.models.loader import load_model
from shardserve.workers.runner.cuda_graphs import DecodeGraphs, pad_decode_inputs
from shardserve.workers.runner.mixed_graphs import MixedGraphs, pack_mixed_inputs, slots_for, token_buckets

BLOCK = 4


@pytest.fixture(scope="module")
def model():
    loaded = load_model(ModelConfig(model="dummy:tiny-llama", seed=3), torch.device("cpu"), torch.float32)
    loaded.model.set_attention_backend(get_attention_backend("triton"))
    return loaded.model


def _step(chunks, max_rows, rows):
    """chunks: per request (cached, new tokens, block ids); rows: their persistent rows."""
    token_ids, positions, slots, starts, seq_lens = [], [], [], [0], []
    rng = np.random.default_rng(0)
    for cached, n, blocks in chunks:
        token_ids += rng.integers(1, 200, n).tolist()
        for pos in range(cached, cached + n):
            positions.append(pos)
            slots.append(blocks[pos // BLOCK] * BLOCK + pos % BLOCK)
        starts.append(starts[-1] + n)
        seq_lens.append(cached + n)
    return [np.array(a, dtype=np.int64) for a in (token_ids, positions, slots, starts, seq_lens, rows)]


def test_token_buckets_cover_every_step_size():
    assert token_buckets(2048) == [16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048]
    assert token_buckets(100) == [16, 32, 64, 100]
    assert token_buckets(8)[-1] == 8
    assert slots_for(16, 256) == 16 and slots_for(2048, 256) == 256


def test_pack_rejects_a_step_larger_than_the_bucket():
    arrays = _step([(0, 20, [1, 2, 3, 4, 5])], 8, [0])
    with pytest.raises(ValueError, match="do not fit"):
        pack_mixed_inputs(*arrays, bucket=16, slots=8)


def test_padded_graph_forward_equals_unpadded_eager_forward(model):
    spec = model.kv_cache_spec
    num_blocks, max_rows = 40, 8
    max_blocks = 10
    # Persistent block table with requests on rows 5, 1, 3 (not a prefix), random pages.
    table = torch.zeros(max_rows, max_blocks, dtype=torch.int32)
    pages = torch.randperm(num_blocks - 1)[:24] + 1
    table[5, :8], table[1, :8], table[3, :8] = pages[:8], pages[8:16], pages[16:24]
    chunks = [(0, 11, table[1].tolist()), (6, 1, table[3].tolist()), (9, 7, table[5].tolist())]
    rows = [1, 3, 5]
    token_ids, positions, slots, starts, seq_lens, rows_np = _step(chunks, max_rows, rows)

    def fresh_caches():
        gen = torch.Generator().manual_seed(7)  # the cached prefixes: same random K/V both times
        return [torch.randn(2, num_blocks, BLOCK, spec.num_kv_heads, spec.head_dim, generator=gen)
                for _ in range(spec.num_layers)]

    eager_caches = fresh_caches()
    metadata = AttentionMetadata(
        num_tokens=int(starts[-1]), num_requests=3, query_start_loc=torch.from_numpy(starts),
        seq_lens=torch.from_numpy(seq_lens), block_tables=table.index_select(0, torch.from_numpy(rows_np)),
        slot_mapping=torch.from_numpy(slots), max_query_len=11, max_seq_len=16,
        query_lens_cpu=[11, 1, 7], seq_lens_cpu=seq_lens.tolist())
    with torch.inference_mode():
        expected = model(torch.from_numpy(token_ids), torch.from_numpy(positions), eager_caches, metadata)

    graph_caches = fresh_caches()
    graphs = MixedGraphs(model, graph_caches, table, token_buckets(64), max_model_len=40, device=torch.device("cpu"))
    bucket = graphs.bucket_for(int(starts[-1]))
    assert bucket == 32
    staged = pack_mixed_inputs(token_ids, positions, slots, starts, seq_lens, rows_np, bucket,
                               slots_for(bucket, max_rows))
    graphs.inputs[: staged.size].copy_(torch.from_numpy(staged))
    with torch.inference_mode():
        hidden = graphs._forward(bucket)
    assert hidden.shape[0] == bucket
    torch.testing.assert_close(hidden[: int(starts[-1])], expected, atol=1e-4, rtol=1e-4)
    # The real tokens' K/V landed where the eager step put them; padding wrote only the null block.
    for eager, graph in zip(eager_caches, graph_caches, strict=True):
        torch.testing.assert_close(graph[:, 1:], eager[:, 1:])


def test_verify_decode_graph_forward_equals_the_mixed_eager_forward(model):
    """A verify step (request on row 5: last token + 4 drafts; row 1: a plain decode row) through the
    verify-decode graph's forward (`DecodeGraphs(gather_rows=True)`, padded to 8 rows, block tables
    gathered by row) equals the same step run eagerly as one extend query per request."""
    spec = model.kv_cache_spec
    num_blocks, max_rows, max_blocks = 40, 8, 10
    table = torch.zeros(max_rows, max_blocks, dtype=torch.int32)
    pages = torch.randperm(num_blocks - 1)[:16] + 1
    table[5, :8], table[1, :8] = pages[:8], pages[8:16]
    chunks = [(3, 1, table[1].tolist()), (9, 5, table[5].tolist())]  # drafts cross a block boundary
    token_ids, positions, slots, starts, seq_lens, rows_np = _step(chunks, max_rows, [1, 5])

    def fresh_caches():
        gen = torch.Generator().manual_seed(7)
        return [torch.randn(2, num_blocks, BLOCK, spec.num_kv_heads, spec.head_dim, generator=gen)
                for _ in range(spec.num_layers)]

    eager_caches = fresh_caches()
    metadata = AttentionMetadata(
        num_tokens=6, num_requests=2, query_start_loc=torch.from_numpy(starts),
        seq_lens=torch.from_numpy(seq_lens), block_tables=table.index_select(0, torch.from_numpy(rows_np)),
        slot_mapping=torch.from_numpy(slots), max_query_len=5, max_seq_len=14,
        query_lens_cpu=[1, 5], seq_lens_cpu=seq_lens.tolist())
    with torch.inference_mode():
        expected = model(torch.from_numpy(token_ids), torch.from_numpy(positions), eager_caches, metadata)

    graph_caches = fresh_caches()
    graphs = DecodeGraphs(model, graph_caches, table, [2, 5, 8], max_model_len=40, device=torch.device("cpu"),
                          gather_rows=True)
    token_rows = np.repeat(rows_np, np.diff(starts))
    staged = pad_decode_inputs(token_ids, positions, slots, positions + 1, 8, token_rows)
    graphs.inputs[:, :8].copy_(torch.from_numpy(staged))
    with torch.inference_mode():
        hidden = graphs._forward(8)
    torch.testing.assert_close(hidden[:6], expected, atol=1e-4, rtol=1e-4)
    for eager, graph in zip(eager_caches, graph_caches, strict=True):
        torch.testing.assert_close(graph[:, 1:], eager[:, 1:])

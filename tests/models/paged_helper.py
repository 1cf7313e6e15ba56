"""Test helper: drives a model over a paged KV cache the way the runner will.

`PagedBatch` keeps, per request, its block table and how many tokens are cached; `step` feeds
one chunk of tokens per request (decodes and prefill chunks mixed), builds AttentionMetadata
and slot mapping exactly as described in workers/attention/metadata.py, runs the model and
returns each request's hidden rows. Blocks are handed out from a shuffled pool so a request's
blocks are not contiguous and chunks cross block boundaries.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from shardserve.workers.attention.metadata import AttentionMetadata


def build_metadata(chunks: list[tuple[int, int, list[int]]], block_size: int,
                   device: torch.device) -> AttentionMetadata:
    """chunks: per request (num_cached, num_new, block_ids) -> metadata of one step."""
    query_lens = [n for _, n, _ in chunks]
    seq_lens = [c + n for c, n, _ in chunks]
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    max_blocks = max(len(b) for _, _, b in chunks)
    tables = [b + [0] * (max_blocks - len(b)) for _, _, b in chunks]
    slots = []
    for cached, num_new, blocks in chunks:
        for pos in range(cached, cached + num_new):
            slots.append(blocks[pos // block_size] * block_size + pos % block_size)
    return AttentionMetadata(
        num_tokens=starts[-1],
        num_requests=len(chunks),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_lens_cpu=query_lens,
        seq_lens_cpu=seq_lens,
    )


@dataclass
class _Request:
    blocks: list[int] = field(default_factory=list)
    num_cached: int = 0


class PagedBatch:
    """A KV cache pool plus per-request block tables for one model."""

    def __init__(self, model: torch.nn.Module, num_blocks: int = 64, block_size: int = 4,
                 dtype: torch.dtype = torch.float32, device: torch.device | None = None, seed: int = 0) -> None:
        spec = model.kv_cache_spec
        self.model = model
        self.block_size = block_size
        self.device = device or torch.device("cpu")
        # Fill with NaN: attention must never read a slot it did not write.
        self.kv_caches = [
            torch.full((2, num_blocks, block_size, spec.num_kv_heads, spec.head_dim), float("nan"),
                       dtype=dtype, device=self.device)
            for _ in range(spec.num_layers)
        ]
        self.free = list(range(1, num_blocks))  # block 0 is the padding entry of block tables
        random.Random(seed).shuffle(self.free)
        self.requests: dict[str, _Request] = {}

    def step(self, chunks: list[tuple[str, list[int]]]) -> list[torch.Tensor]:
        """Feed each (request id, new token ids); returns each request's hidden rows [n, hidden]."""
        meta_chunks, input_ids, positions = [], [], []
        for request_id, token_ids in chunks:
            req = self.requests.setdefault(request_id, _Request())
            total = req.num_cached + len(token_ids)
            while len(req.blocks) * self.block_size < total:
                req.blocks.append(self.free.pop())
            meta_chunks.append((req.num_cached, len(token_ids), list(req.blocks)))
            input_ids += token_ids
            positions += range(req.num_cached, total)
        metadata = build_metadata(meta_chunks, self.block_size, self.device)
        with torch.inference_mode():
            hidden = self.model(torch.tensor(input_ids, device=self.device),
                                torch.tensor(positions, device=self.device), self.kv_caches, metadata)
        for request_id, token_ids in chunks:
            self.requests[request_id].num_cached += len(token_ids)
        return list(hidden.split([len(t) for _, t in chunks]))

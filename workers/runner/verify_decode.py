"""Verify steps run as decode steps: every verify token is one decode query (speculative decoding).

Why: a verify step (each request's last known token + its k drafts) would run as a mixed step: a
token-count graph padded to 16 tokens with the paged extend-attention kernel; a decode step of
(1 + k) * B rows takes a decode graph of that size and the split-K decode kernel instead.
Data flow: `is_verify_decode(layout)`: some request has drafts and every request feeds exactly
1 + its drafts tokens (no prefill chunk). `decode_rows(layout)` keeps the step's flat token order
(so hidden rows, sampling positions and async placeholders are unchanged) and gives token j its
own query: context `positions[j] + 1` over its request's block table (the persistent row,
repeated). Every layer writes the step's K/V before attending, so draft i sees the drafts before
it and none after: causality falls out of the lengths. The runner replays a decode graph that
gathers block tables by row (`DecodeGraphs(gather_rows=True)`, `verify_graph_sizes`) or runs it
eagerly (CPU). Cost: each context is read once per query instead of once per request, so
`takes_decode_path` keeps those extra reads a small fraction of the step's weight reads; longer
contexts stay on the mixed path. Rejection and KV rollback are the same as on the mixed path.
"""

from __future__ import annotations

import numpy as np
import torch
from shardserve.workers.attention.metadata import AttentionMetadata
from shardserve.workers.runner.cuda_graphs import graph_batch_sizes
from shardserve.workers.runner.persistent_batch import StepLayout

# The decode path's extra K/V reads at most this fraction of the model's weight bytes (at batch 1
# the step streams the weights once; past this, the extend kernel's single read per context wins).
VERIFY_DECODE_KV_FRACTION = 0.05
# Largest verify step (tokens) run as decode rows (and given a decode graph); larger ones take the
# mixed path, whose extend kernel reads each context once.
VERIFY_DECODE_MAX_TOKENS = 64


def is_verify_decode(layout: StepLayout) -> bool:
    """True when the step has drafts and every request feeds 1 + num_drafts tokens (decode-like)."""
    num_drafts = sum(r.num_drafts for r in layout.requests)
    return num_drafts > 0 and layout.num_tokens == len(layout.requests) + num_drafts


def decode_rows(layout: StepLayout) -> tuple[np.ndarray, np.ndarray]:
    """(seq_lens [T], rows [T]) int64: one decode query per token, in the step's token order."""
    lens = np.diff(layout.query_start)
    return layout.positions + 1, np.repeat(layout.rows, lens)


def extra_context_tokens(layout: StepLayout) -> int:
    """Context tokens the decode path reads beyond the extend path's one read per request."""
    return int(layout.positions.sum()) + layout.num_tokens - int(layout.seq_lens.sum())


def kv_budget_tokens(model: torch.nn.Module, kv_bytes_per_token: int) -> int:
    """`extra_context_tokens` allowed per step: VERIFY_DECODE_KV_FRACTION of the weight bytes."""
    weight_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return int(VERIFY_DECODE_KV_FRACTION * weight_bytes / max(kv_bytes_per_token, 1))


def takes_decode_path(layout: StepLayout, budget_tokens: int) -> bool:
    """A decode-like verify step of at most VERIFY_DECODE_MAX_TOKENS tokens within the K/V budget."""
    return (layout.num_tokens <= VERIFY_DECODE_MAX_TOKENS and is_verify_decode(layout)
            and extra_context_tokens(layout) <= budget_tokens)


def verify_graph_sizes(num_speculative_tokens: int, max_verify_tokens: int, max_rows: int) -> list[int]:
    """Decode-graph sizes for verify steps: every size 2 .. 1 + k (batch 1, any adaptive k, unpadded),
    then the decode buckets (8, 16, 24, ...) up to the largest verify step, capped at VERIFY_DECODE_MAX_TOKENS."""
    cap = min(max_verify_tokens, max_rows * (1 + num_speculative_tokens), VERIFY_DECODE_MAX_TOKENS)
    if cap < 2:
        return []
    sizes = set(range(2, min(cap, 1 + num_speculative_tokens) + 1)) | set(graph_batch_sizes(cap))
    return sorted(s for s in sizes if s >= 2)


def eager_metadata(layout: StepLayout, slot_mapping: torch.Tensor, positions: torch.Tensor,
                   block_tables: torch.Tensor) -> AttentionMetadata:
    """Decode metadata of a verify step for an eager forward: T one-token requests (device tensors
    uploaded by the runner: slot_mapping [T], positions [T], block_tables [T, max_blocks] gathered)."""
    num_tokens = layout.num_tokens
    host_seq_lens, _ = decode_rows(layout)
    seq_lens = positions + 1  # [T] each query's context: its own position and everything before
    return AttentionMetadata(
        num_tokens=num_tokens,
        num_requests=num_tokens,
        query_start_loc=torch.arange(num_tokens + 1, dtype=torch.int64, device=seq_lens.device),
        seq_lens=seq_lens,
        block_tables=block_tables,
        slot_mapping=slot_mapping,
        max_query_len=1,
        max_seq_len=int(host_seq_lens.max()),
        query_lens_cpu=[1] * num_tokens,
        seq_lens_cpu=host_seq_lens.tolist(),
    )

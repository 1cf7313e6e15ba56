"""CUDA graphs for steps that carry prefill tokens: one captured forward per token-count bucket.

Why: eagerly, a step with a prefill chunk pays ~7 Triton launches x every layer on the host
(benchmarks/README.md), more than its GPU time at chunks of a few hundred tokens, the steady
state of continuous batching. Attention itself is graph-safe (the extend kernel's grid depends
only on the token count and the number of request slots), so the whole forward is captured.

Data flow: at start-up `MixedGraphs.capture` records, for every bucket T in
`token_buckets(max_num_batched_tokens)` (largest first, in the runner's shared graph pool), the
forward over T tokens split among R = min(max_num_seqs, T) request slots. A bucket's inputs are
views of one persistent int64 buffer laid out by `pack_mixed_inputs`: token ids [T], positions
[T], slot mapping [T], query_start [R + 1], seq lens [R] and persistent-batch rows [R]; block
tables are gathered by those rows inside the graph, so any rows can be scheduled. A step of n
tokens picks the smallest bucket T >= n; padding tokens belong to no request and write their
K/V to the null block 0; padding request slots have query length 0, so the kernel skips them.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from shardserve.workers.attention.metadata import AttentionMetadata
from shardserve.workers.runner.cuda_graphs import bucket_for, capture_buckets, copy_hidden_in

logger = logging.getLogger(__name__)


def token_buckets(max_num_batched_tokens: int, min_bucket: int = 16) -> list[int]:
    """Powers of two from min_bucket up to 512, then every 256, up to and including the budget."""
    if max_num_batched_tokens < 1:
        raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
    sizes: set[int] = set()
    size = min_bucket
    while size <= min(512, max_num_batched_tokens):
        sizes.add(size)
        size *= 2
    sizes.update(range(768, max_num_batched_tokens + 1, 256))
    sizes.add(max_num_batched_tokens)
    return sorted(sizes)


def slots_for(bucket: int, max_rows: int) -> int:
    """Request slots of a bucket: every request brings at least one token."""
    return min(max_rows, bucket)


def mixed_input_size(bucket: int, slots: int) -> int:
    return 3 * bucket + 3 * slots + 1


def pack_mixed_inputs(token_ids: np.ndarray, positions: np.ndarray, slot_mapping: np.ndarray,
                      query_start: np.ndarray, seq_lens: np.ndarray, rows: np.ndarray,
                      bucket: int, slots: int) -> np.ndarray:
    """The flat int64 graph input of one step padded to (bucket tokens, slots requests)."""
    num_tokens, num_requests = token_ids.size, rows.size
    if num_tokens > bucket or num_requests > slots:
        raise ValueError(f"{num_tokens} tokens / {num_requests} requests do not fit a bucket of "
                         f"{bucket} tokens / {slots} requests")
    out = np.zeros(mixed_input_size(bucket, slots), dtype=np.int64)  # padding tokens: id 0, pos 0, slot 0
    out[:num_tokens] = token_ids
    out[bucket : bucket + num_tokens] = positions
    out[2 * bucket : 2 * bucket + num_tokens] = slot_mapping
    qs = 3 * bucket
    out[qs : qs + num_requests + 1] = query_start
    out[qs + num_requests + 1 : qs + slots + 1] = query_start[-1]  # padded slots: query length 0
    lens = qs + slots + 1
    out[lens : lens + num_requests] = seq_lens  # padded slots: context 0
    out[lens + slots : lens + slots + num_requests] = rows  # padded slots gather row 0 (never read)
    return out


class MixedGraphs:
    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], block_table: torch.Tensor,
                 buckets: list[int], max_model_len: int, device: torch.device,
                 hidden_in: torch.Tensor | None = None) -> None:
        self.model = model
        # [>= max bucket, hidden]: a later pipeline stage's input, written before each replay
        self.hidden_in = hidden_in
        self.kv_caches = kv_caches
        self.block_table = block_table  # [max_rows, max_blocks] int32, the persistent batch's
        self.buckets = buckets
        self.max_rows = block_table.shape[0]
        self.max_model_len = max_model_len
        self.device = device
        largest = buckets[-1]
        self.inputs = torch.zeros(mixed_input_size(largest, slots_for(largest, self.max_rows)),
                                  dtype=torch.int64, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}  # bucket -> [bucket, hidden]

    def bucket_for(self, num_tokens: int) -> int | None:
        return bucket_for(num_tokens, self.buckets)

    def _forward(self, bucket: int) -> torch.Tensor:
        slots = slots_for(bucket, self.max_rows)
        buf = self.inputs
        qs, lens = 3 * bucket, 3 * bucket + slots + 1
        seq_lens = buf[lens : lens + slots]
        metadata = AttentionMetadata(
            num_tokens=bucket,
            num_requests=slots,
            query_start_loc=buf[qs : qs + slots + 1],
            seq_lens=seq_lens,
            block_tables=self.block_table.index_select(0, buf[lens + slots : lens + 2 * slots]),
            slot_mapping=buf[2 * bucket : 3 * bucket],
            max_query_len=bucket,  # > 1: the backend takes the extend kernel
            max_seq_len=self.max_model_len,
            query_lens_cpu=[],  # host copies are for eager backends; graphs run the Triton one
            seq_lens_cpu=[],
        )
        hidden_in = None if self.hidden_in is None else self.hidden_in[:bucket]
        return self.model(buf[:bucket], buf[bucket : 2 * bucket], self.kv_caches, metadata, hidden_in)

    @torch.inference_mode()
    def capture(self, pool: tuple[int, int]) -> None:
        self.inputs.zero_()  # a valid empty step: every slot has query length 0
        self._graphs, self._outputs = capture_buckets(self.buckets, self._forward, pool)
        logger.info("captured %d mixed-step CUDA graphs (%d..%d tokens)", len(self._graphs),
                    self.buckets[0], self.buckets[-1])

    def run(self, bucket: int, staged: torch.Tensor, hidden_in: torch.Tensor | None = None) -> torch.Tensor:
        """Replay bucket's graph on `staged` (pack_mixed_inputs, on the device) and, on a later
        pipeline stage, the received `hidden_in` [n <= bucket, hidden]; returns [bucket, hidden]."""
        self.inputs[: staged.numel()].copy_(staged)
        copy_hidden_in(self.hidden_in, hidden_in)
        self._graphs[bucket].replay()
        return self._outputs[bucket]

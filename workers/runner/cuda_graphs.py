"""CUDA graphs for decode steps: one captured forward per batch-size bucket.

Data flow: at start-up (after the KV pool exists) `DecodeGraphs.capture` records, for every
bucket B in `graph_batch_sizes(max_num_seqs)` (1, 2, 4, 8, 16, 24, ... max_num_seqs; largest
first, all in one memory pool), the model's forward over B one-token requests. Its inputs are
persistent device buffers — `inputs [4, max_rows]` int64 holding token ids, positions, slot
mapping and seq lens — plus the persistent batch's device block table, so a replay reads
whatever the step wrote there. A decode step with n requests (rows 0..n-1) picks the
smallest bucket B >= n (`bucket_for`); `pad_decode_inputs` fills rows n..B-1 with token 0,
position 0, slot 0 (block 0, the null block, takes their K/V) and seq_len 1, so padded rows
attend to one token of the null block and never touch a real request's cache. The split
count of the decode-attention kernel is fixed per bucket: capture passes `max_seq_len =
max_model_len`, so the kernel sizes its splits for the longest context it may ever see and
the same graph is valid for every context length (empty splits weigh nothing). With
`gather_rows` (verify steps run as decode rows: verify_decode.py) a fifth input field holds each
row's persistent-batch row and the graph gathers its block table by it. Prefill and
mixed steps replay the token-count graphs of mixed_graphs.py; a model that synchronises with
the host inside its forward (the MoE expert loop) runs eagerly, which the runner detects before
capturing.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable

import numpy as np
import torch
from shardserve.workers.attention.metadata import AttentionMetadata

logger = logging.getLogger(__name__)

NUM_INPUT_FIELDS = 4  # token ids, positions, slot mapping, seq lens
NUM_GATHER_FIELDS = 5  # ... and the persistent-batch row whose block table a row reads


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """Buckets 1, 2, 4, then every multiple of 8 up to max_num_seqs (which is always one)."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    sizes = {b for b in (1, 2, 4) if b <= max_num_seqs} | set(range(8, max_num_seqs + 1, 8))
    sizes.add(max_num_seqs)
    return sorted(sizes)


def bucket_for(num_rows: int, sizes: list[int]) -> int | None:
    """Smallest bucket >= num_rows, or None when the batch is larger than every bucket."""
    i = bisect.bisect_left(sizes, num_rows)
    return sizes[i] if i < len(sizes) else None


def pad_decode_inputs(token_ids: np.ndarray, positions: np.ndarray, slot_mapping: np.ndarray,
                      seq_lens: np.ndarray, bucket: int, rows: np.ndarray | None = None) -> np.ndarray:
    """[4, bucket] int64 graph inputs ([5, bucket] with the persistent `rows` of a gathering graph);
    rows past the real ones write to the null block 0 (a gathering graph's padding reads row 0's
    first slot: read only, its result is never used)."""
    num = token_ids.size
    if num > bucket:
        raise ValueError(f"{num} requests do not fit a bucket of {bucket}")
    fields = NUM_INPUT_FIELDS if rows is None else NUM_GATHER_FIELDS
    out = np.zeros((fields, bucket), dtype=np.int64)  # padding: token 0, pos 0, slot 0, row 0
    out[0, :num] = token_ids
    out[1, :num] = positions
    out[2, :num] = slot_mapping
    out[3, :num] = seq_lens
    out[3, num:] = 1  # one token of context: the null block's slot 0
    if rows is not None:
        out[4, :num] = rows
    return out


def capture_buckets(buckets: list[int], forward: Callable[[int], torch.Tensor], pool: tuple[int, int]
                    ) -> tuple[dict[int, torch.cuda.CUDAGraph], dict[int, torch.Tensor]]:
    """Capture `forward(bucket)` for every bucket into `pool`, largest first (later captures
    reuse the pool's freed memory); each is run once eagerly first so its kernels compile
    outside the capture. Returns the graphs and their output tensors by bucket."""
    graphs: dict[int, torch.cuda.CUDAGraph] = {}
    outputs: dict[int, torch.Tensor] = {}
    for bucket in reversed(buckets):
        forward(bucket)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outputs[bucket] = forward(bucket)
        graphs[bucket] = graph
    return graphs, outputs


def copy_hidden_in(buffer: torch.Tensor | None, hidden_in: torch.Tensor | None) -> None:
    """Write a later pipeline stage's received activations into its graphs' static input."""
    if hidden_in is not None:
        assert buffer is not None, "this runner's graphs were captured without a hidden_in buffer"
        buffer[: hidden_in.shape[0]].copy_(hidden_in)


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], block_table: torch.Tensor,
                 sizes: list[int], max_model_len: int, device: torch.device,
                 hidden_in: torch.Tensor | None = None, gather_rows: bool = False) -> None:
        self.model = model
        self.gather_rows = gather_rows  # block tables gathered by the row field (not rows 0..B-1)
        # [>= max bucket, hidden]: a later pipeline stage's input, written before each replay
        self.hidden_in = hidden_in
        self.kv_caches = kv_caches
        self.block_table = block_table  # [max_rows, max_blocks] int32, the persistent batch's
        self.sizes = sizes
        self.max_model_len = max_model_len
        self.device = device
        max_rows = block_table.shape[0] if not gather_rows else sizes[-1]
        if sizes[-1] > max_rows:
            raise ValueError(f"largest bucket {sizes[-1]} exceeds the block table's {max_rows} rows")
        fields = NUM_GATHER_FIELDS if gather_rows else NUM_INPUT_FIELDS
        self.inputs = torch.zeros(fields, max_rows, dtype=torch.int64, device=device)  # [4 or 5, max_rows]
        self.inputs[3].fill_(1)
        self._query_start = torch.arange(max_rows + 1, dtype=torch.int64, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}  # bucket -> [bucket, hidden]
        self.pool_bytes = 0

    def _metadata(self, bucket: int) -> AttentionMetadata:
        if self.gather_rows:
            block_tables = self.block_table.index_select(0, self.inputs[4, :bucket])  # [bucket, max_blocks]
        else:
            block_tables = self.block_table[:bucket]
        return AttentionMetadata(
            num_tokens=bucket,
            num_requests=bucket,
            query_start_loc=self._query_start[: bucket + 1],
            seq_lens=self.inputs[3, :bucket],
            block_tables=block_tables,
            slot_mapping=self.inputs[2, :bucket],
            max_query_len=1,
            max_seq_len=self.max_model_len,  # pins the split count: valid for any context
            query_lens_cpu=[1] * bucket,
            seq_lens_cpu=[self.max_model_len] * bucket,
        )

    def _forward(self, bucket: int) -> torch.Tensor:
        hidden_in = None if self.hidden_in is None else self.hidden_in[:bucket]
        return self.model(self.inputs[0, :bucket], self.inputs[1, :bucket], self.kv_caches, self._metadata(bucket),
                          hidden_in)

    @torch.inference_mode()
    def capture(self, pool: tuple[int, int] | None = None) -> None:
        """Capture every bucket into `pool` (shared with the mixed-step graphs), or a new one."""
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_reserved(self.device)
        pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        self._graphs, self._outputs = capture_buckets(self.sizes, self._forward, pool)
        torch.cuda.synchronize(self.device)
        self.pool_bytes = torch.cuda.memory_reserved(self.device) - before
        logger.info("captured %d %s CUDA graphs (batch %d..%d), %.1f MiB", len(self._graphs),
                    "verify-decode" if self.gather_rows else "decode", self.sizes[0], self.sizes[-1],
                    self.pool_bytes / 2**20)

    def run(self, bucket: int, staged: torch.Tensor, hidden_in: torch.Tensor | None = None) -> torch.Tensor:
        """Replay bucket's graph on `staged` [4 or 5, bucket] device inputs (and, on a later pipeline
        stage, the received `hidden_in` [n <= bucket, hidden]); returns [bucket, hidden]."""
        self.inputs[:, :bucket].copy_(staged)
        copy_hidden_in(self.hidden_in, hidden_in)
        self._graphs[bucket].replay()
        return self._outputs[bucket]

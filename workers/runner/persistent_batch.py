"""The persistent batch: running requests as rows of host arrays that change by diffs.

Data flow: a request gets a row when it (re)joins (`add`) and keeps it until it finishes or
is preempted (`remove`, which moves the last row into the hole so rows 0..num_rows-1 stay
dense). The block table lives twice: a numpy mirror `[max_rows, max_blocks_per_row]` on the
host and the same tensor on the device, which the attention kernels (and CUDA graphs) read.
Each step `update_blocks` appends the blocks a request gained; only those entries (and rows
rewritten by a move) are queued as (row, col, block) diffs and applied on the device with one
scatter, so a step never re-sends whole block tables. `layout` turns the scheduled requests
into this step's flat token layout in row order — token ids, positions, slot mapping, query
starts, seq lens — with numpy, no per-token Python loop. Rows of the device table that hold
no request are all 0: the null block, which padded rows of a CUDA-graph batch point at.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
from shardserve.workers.step_types import ScheduledRequest


@dataclass
class StepLayout:
    """This step's scheduled requests in row order and where their tokens sit.

    rows: [R] persistent rows; query_start: [R + 1] token offsets; all int64 numpy.
    token_ids / positions / slot_mapping: [T] int64; seq_lens: [R] context after the step.
    """

    requests: list[ScheduledRequest]
    rows: np.ndarray
    query_start: np.ndarray
    token_ids: np.ndarray
    positions: np.ndarray
    slot_mapping: np.ndarray
    seq_lens: np.ndarray

    @property
    def num_tokens(self) -> int:
        return int(self.query_start[-1])

    @property
    def is_decode_only(self) -> bool:
        return self.num_tokens == len(self.requests)

    @property
    def rows_are_prefix(self) -> bool:
        """True when the scheduled rows are exactly 0..R-1 (block tables need no gather)."""
        return bool(self.rows.size == 0 or self.rows[-1] == self.rows.size - 1)


class PersistentBatch:
    def __init__(self, max_rows: int, max_blocks_per_row: int, block_size: int, device: torch.device) -> None:
        self.max_rows = max_rows
        self.max_blocks_per_row = max_blocks_per_row
        self.block_size = block_size
        self.req_ids: list[str | None] = [None] * max_rows
        self.row_of: dict[str, int] = {}
        self.block_table = np.zeros((max_rows, max_blocks_per_row), dtype=np.int64)  # host mirror
        self.num_blocks = np.zeros(max_rows, dtype=np.int64)  # valid entries per row
        # [max_rows, max_blocks_per_row] int32, what the kernels read
        self.block_table_device = torch.zeros((max_rows, max_blocks_per_row), dtype=torch.int32, device=device)
        self._diffs: list[tuple[int, int, int]] = []  # (row, first col, end col) rewritten on the host

    @property
    def num_rows(self) -> int:
        return len(self.row_of)

    def add(self, request_id: str) -> int:
        if request_id in self.row_of:
            raise ValueError(f"request {request_id!r} already has row {self.row_of[request_id]}")
        row = len(self.row_of)
        if row >= self.max_rows:
            raise ValueError(f"persistent batch is full ({self.max_rows} rows); raise max_num_seqs")
        self.req_ids[row] = request_id
        self.row_of[request_id] = row
        return row

    def remove(self, request_id: str) -> tuple[int, int] | None:
        """Drop a request; returns (src, dst) when the last row moved into its place."""
        row = self.row_of.pop(request_id, None)
        if row is None:
            return None
        last = len(self.row_of)  # index of the last occupied row before removal
        moved = None
        if row != last:
            moved_id = self.req_ids[last]
            assert moved_id is not None
            n = int(self.num_blocks[last])
            old = int(self.num_blocks[row])
            self.block_table[row, :n] = self.block_table[last, :n]
            self.block_table[row, n:old] = 0
            self.num_blocks[row] = n
            self._diffs.append((row, 0, max(n, old)))
            self.req_ids[row] = moved_id
            self.row_of[moved_id] = row
            moved = (last, row)
        n_last = int(self.num_blocks[last])
        self.block_table[last, :n_last] = 0
        self.num_blocks[last] = 0
        self._diffs.append((last, 0, n_last))
        self.req_ids[last] = None
        return moved

    def append_blocks(self, row: int, new_block_ids: tuple[int, ...]) -> None:
        """Append the blocks the scheduler allocated to the row's request since the last step."""
        if not new_block_ids:
            return
        start = int(self.num_blocks[row])
        end = start + len(new_block_ids)
        if end > self.max_blocks_per_row:
            raise ValueError(f"request needs {end} blocks, more than max_blocks_per_row {self.max_blocks_per_row}")
        self.block_table[row, start:end] = new_block_ids
        self.num_blocks[row] = end
        self._diffs.append((row, start, end))

    def pending_diffs(self) -> tuple[np.ndarray, np.ndarray]:
        """(flat indices into the device table, values) of every entry rewritten since the last call."""
        if not self._diffs:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty
        width = self.max_blocks_per_row
        index = np.concatenate([np.arange(r * width + a, r * width + b, dtype=np.int64) for r, a, b in self._diffs])
        self._diffs.clear()
        return index, self.block_table.reshape(-1)[index]

    def apply_diffs(self, index: torch.Tensor, values: torch.Tensor) -> None:
        """Write uploaded diffs into the device table (one scatter)."""
        if index.numel():
            self.block_table_device.view(-1).index_copy_(0, index, values.to(torch.int32))

    def layout(self, scheduled: tuple[ScheduledRequest, ...]) -> StepLayout:
        """This step's token layout in row order (see StepLayout)."""
        row_of = self.row_of
        if len(scheduled) == 1:  # batch 1 (a speculating request's verify step above all): no sort, no repeats
            return self._layout_one(scheduled[0])
        requests = sorted(scheduled, key=lambda r: row_of[r.request_id])
        num = len(requests)
        rows = np.fromiter((row_of[r.request_id] for r in requests), dtype=np.int64, count=num)
        starts = np.fromiter((r.start_position for r in requests), dtype=np.int64, count=num)
        lens = np.fromiter((len(r.token_ids) for r in requests), dtype=np.int64, count=num)
        query_start = np.zeros(num + 1, dtype=np.int64)
        np.cumsum(lens, out=query_start[1:])
        total = int(query_start[-1])
        if total == num:  # decode only: one token per request
            token_ids = np.fromiter((r.token_ids[0] for r in requests), dtype=np.int64, count=num)
            positions = starts
            token_rows = rows
        else:
            token_ids = np.fromiter(itertools.chain.from_iterable(r.token_ids for r in requests),
                                    dtype=np.int64, count=total)
            token_rows = np.repeat(rows, lens)
            positions = np.arange(total, dtype=np.int64) - np.repeat(query_start[:-1] - starts, lens)
        blocks = self.block_table[token_rows, positions // self.block_size]
        slot_mapping = blocks * self.block_size + positions % self.block_size
        return StepLayout(requests, rows, query_start, token_ids, positions, slot_mapping, starts + lens)

    def _layout_one(self, request: ScheduledRequest) -> StepLayout:
        """`layout` of a single request."""
        row, start, num = self.row_of[request.request_id], request.start_position, len(request.token_ids)
        positions = np.arange(start, start + num, dtype=np.int64)
        slot_mapping = self.block_table[row, positions // self.block_size] * self.block_size + positions % self.block_size
        return StepLayout([request], np.array([row], dtype=np.int64), np.array([0, num], dtype=np.int64),
                          np.array(request.token_ids, dtype=np.int64), positions, slot_mapping,
                          np.array([start + num], dtype=np.int64))

"""CPU tests of the persistent batch: rows, block-table diffs, token layout, device mirror."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from shardserve.workers.runner.persistent_batch import PersistentBatch
from shardserve.workers.step_types import ScheduledRequest

BLOCK = 4


def _batch() -> PersistentBatch:
    return PersistentBatch(max_rows=4, max_blocks_per_row=8, block_size=BLOCK, device=torch.device("cpu"))


def _sync(batch: PersistentBatch) -> np.ndarray:
    index, values = batch.pending_diffs()
    batch.apply_diffs(torch.from_numpy(index), torch.from_numpy(values))
    return index


def test_block_table_diffs_send_only_new_entries_and_mirror_the_host():
    batch = _batch()
    row = batch.add("a")
    batch.append_blocks(row, (7, 3))
    assert _sync(batch).tolist() == [0, 1]
    batch.append_blocks(row, ())  # no new block this step: nothing to send
    assert _sync(batch).size == 0
    batch.append_blocks(row, (9,))
    assert _sync(batch).tolist() == [2]  # only the appended entry
    assert batch.block_table_device[0, :4].tolist() == [7, 3, 9, 0]


def test_remove_moves_the_last_row_and_zeroes_the_vacated_row():
    batch = _batch()
    for rid, blocks in (("a", (1, 2, 3)), ("b", (4,)), ("c", (5, 6))):
        batch.append_blocks(batch.add(rid), blocks)
    _sync(batch)
    assert batch.remove("a") == (2, 0)  # c moves from row 2 into row 0
    assert batch.row_of == {"c": 0, "b": 1} and batch.req_ids[2] is None
    _sync(batch)
    table = batch.block_table_device
    assert table[0, :3].tolist() == [5, 6, 0]  # a's third block cleared
    assert table[2].tolist() == [0] * 8  # a row without a request points at the null block
    np.testing.assert_array_equal(batch.block_table, table.numpy())
    assert batch.remove("b") is None and batch.remove("unknown") is None
    with pytest.raises(ValueError, match="already has row"):
        batch.add("c")


def test_layout_is_in_row_order_with_positions_and_slots_per_token():
    batch = _batch()
    batch.append_blocks(batch.add("a"), (3, 5))
    batch.append_blocks(batch.add("b"), (8,))
    scheduled = (
        ScheduledRequest("b", (21, 22), 1, (8,), True),  # scheduler order differs from row order
        ScheduledRequest("a", (11,), 5, (3, 5), True),
    )
    layout = batch.layout(scheduled)
    assert [r.request_id for r in layout.requests] == ["a", "b"]
    assert layout.token_ids.tolist() == [11, 21, 22]
    assert layout.positions.tolist() == [5, 1, 2]
    assert layout.slot_mapping.tolist() == [5 * BLOCK + 1, 8 * BLOCK + 1, 8 * BLOCK + 2]
    assert layout.query_start.tolist() == [0, 1, 3]
    assert layout.seq_lens.tolist() == [6, 3]
    assert not layout.is_decode_only and layout.rows_are_prefix


def test_decode_layout_and_rows_that_are_not_a_prefix():
    batch = _batch()
    for rid in ("a", "b", "c"):
        batch.append_blocks(batch.add(rid), (1 + len(batch.row_of),))
    layout = batch.layout((ScheduledRequest("c", (9,), 2, (4,), True),))
    assert layout.is_decode_only and not layout.rows_are_prefix
    assert layout.rows.tolist() == [2] and layout.slot_mapping.tolist() == [4 * BLOCK + 2]

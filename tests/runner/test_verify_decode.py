"""CPU tests of which verify steps run as decode rows (runner/verify_decode.py) and their graph inputs."""

from __future__ import annotations

import numpy as np
import torch
from shardserve.workers.runner.cuda_graphs import pad_decode_inputs
from shardserve.workers.runner.persistent_batch import PersistentBatch, StepLayout
from shardserve.workers.runner.verify_decode import (
    VERIFY_DECODE_MAX_TOKENS,
    decode_rows,
    extra_context_tokens,
    is_verify_decode,
    takes_decode_path,
    verify_graph_sizes,
)
from shardserve.workers.step_types import ScheduledRequest

BLOCK = 16


def _layout(steps: list[tuple[int, int, int]]) -> StepLayout:
    """Layout of requests given as (cached tokens, tokens fed, drafts among them), rows 0.. in order."""
    batch = PersistentBatch(8, 64, BLOCK, torch.device("cpu"))
    scheduled = []
    for i, (start, fed, drafts) in enumerate(steps):
        batch.add(f"r{i}")
        blocks = tuple(range(1 + 10 * i, 1 + 10 * i + -(-(start + fed) // BLOCK)))
        batch.append_blocks(i, blocks)
        scheduled.append(ScheduledRequest(f"r{i}", tuple(range(fed)), start, blocks, True, num_drafts=drafts))
    return batch.layout(tuple(scheduled))


def test_decode_rows_give_each_verify_token_its_own_causal_context():
    layout = _layout([(30, 5, 4), (7, 1, 0), (15, 3, 2)])  # verify, plain decode row, verify across a block
    assert is_verify_decode(layout)
    seq_lens, rows = decode_rows(layout)
    np.testing.assert_array_equal(seq_lens, [31, 32, 33, 34, 35, 8, 16, 17, 18])
    np.testing.assert_array_equal(rows, [0, 0, 0, 0, 0, 1, 2, 2, 2])
    # extend reads each context once (35 + 8 + 18); decode rows read 31..35, 8, 16..18
    assert extra_context_tokens(layout) == (31 + 32 + 33 + 34 + 35 + 8 + 16 + 17 + 18) - (35 + 8 + 18)


def test_only_decode_like_steps_within_budget_take_the_decode_path():
    assert not is_verify_decode(_layout([(7, 1, 0), (9, 1, 0)]))  # plain decode: the decode graphs
    assert not is_verify_decode(_layout([(30, 5, 4), (0, 12, 0)]))  # a prefill chunk beside: mixed step
    assert not is_verify_decode(_layout([(30, 5, 4), (16, 4, 0)]))  # a chunk with cached prefix
    short = _layout([(30, 5, 4)])
    assert takes_decode_path(short, extra_context_tokens(short))
    assert not takes_decode_path(short, extra_context_tokens(short) - 1)  # over the K/V budget
    wide = _layout([(10, 9, 8)] * 8)  # 72 tokens
    assert wide.num_tokens > VERIFY_DECODE_MAX_TOKENS and not takes_decode_path(wide, 1 << 30)


def test_verify_graph_sizes_cover_batch_one_unpadded_and_stop_at_the_largest_verify_step():
    assert verify_graph_sizes(4, 128, 256) == [2, 3, 4, 5, 8, 16, 24, 32, 40, 48, 56, 64]
    assert verify_graph_sizes(4, 1 << 20, 1) == [2, 3, 4, 5]  # one request: 1 + k rows at most
    assert verify_graph_sizes(4, 10, 256) == [2, 3, 4, 5, 8, 10]  # speculation stops past 10 tokens
    assert verify_graph_sizes(1, 1, 256) == []


def test_gathering_graph_inputs_carry_the_rows_and_pad_to_the_null_block():
    layout = _layout([(30, 5, 4), (7, 1, 0)])
    seq_lens, rows = decode_rows(layout)
    staged = pad_decode_inputs(layout.token_ids, layout.positions, layout.slot_mapping, seq_lens, 8, rows)
    assert staged.shape == (5, 8)
    np.testing.assert_array_equal(staged[:, :6], np.stack([layout.token_ids, layout.positions, layout.slot_mapping,
                                                           seq_lens, rows]))
    np.testing.assert_array_equal(staged[:, 6:], [[0, 0]] * 3 + [[1, 1], [0, 0]])

"""CPU tests of the logic around decode CUDA graphs: buckets, padding to a bucket, null block."""

from __future__ import annotations

import numpy as np
import pytest
from shardserve.workers.runner.cuda_graphs import bucket_for, graph_batch_sizes, pad_decode_inputs


def test_graph_batch_sizes_cover_every_batch_up_to_max():
    sizes = graph_batch_sizes(50)
    assert sizes == [1, 2, 4, 8, 16, 24, 32, 40, 48, 50]
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(3) == [1, 2, 3]
    for n in range(1, 51):
        bucket = bucket_for(n, sizes)
        assert bucket is not None and bucket >= n
        assert all(s < n for s in sizes if s < bucket), "the smallest bucket that fits is chosen"


def test_bucket_for_rejects_batches_larger_than_every_bucket():
    assert bucket_for(257, graph_batch_sizes(256)) is None
    assert bucket_for(256, graph_batch_sizes(256)) == 256
    with pytest.raises(ValueError, match="max_num_seqs"):
        graph_batch_sizes(0)


def test_padding_rows_write_to_the_null_block_and_see_one_token():
    ids, pos = np.array([11, 12, 13]), np.array([5, 40, 7])
    slots, lens = np.array([165, 999, 23]), pos + 1
    staged = pad_decode_inputs(ids, pos, slots, lens, bucket=8)
    assert staged.shape == (4, 8) and staged.dtype == np.int64
    np.testing.assert_array_equal(staged[:, :3], np.stack([ids, pos, slots, lens]))
    # Padded rows: token 0 at position 0, K/V written to slot 0 (block 0 = null block), context 1.
    np.testing.assert_array_equal(staged[0, 3:], 0)
    np.testing.assert_array_equal(staged[1, 3:], 0)
    np.testing.assert_array_equal(staged[2, 3:], 0)
    np.testing.assert_array_equal(staged[3, 3:], 1)
    with pytest.raises(ValueError, match="do not fit"):
        pad_decode_inputs(ids, pos, slots, lens, bucket=2)

"""BlockPool: reference counting, the reserved null block, LRU eviction and cached-block revival;
prefix_hash: chained, deterministic block hashes."""

import subprocess
import sys

import pytest
from shardserve.workers.kv_cache.block_pool import NULL_BLOCK_ID, BlockPool
from shardserve.workers.kv_cache.prefix_hash import ROOT_HASH, block_hashes, hash_block


def test_allocate_never_hands_out_null_block_and_counts_free():
    pool = BlockPool(5)
    assert pool.num_usable_blocks == 4 and pool.num_free_blocks == 4 and pool.usage == 0.0
    block_ids = pool.allocate(4)
    assert sorted(block_ids) == [1, 2, 3, 4]
    assert NULL_BLOCK_ID not in block_ids
    assert pool.num_free_blocks == 0 and pool.usage == 1.0
    with pytest.raises(ValueError, match=r"num_blocks must be in \[0, 0\]"):
        pool.allocate(1)
    pool.free(block_ids)
    assert pool.num_free_blocks == 4


def test_pool_needs_a_usable_block_and_rejects_null_or_unknown_ids():
    with pytest.raises(ValueError, match="num_blocks must be >= 2"):
        BlockPool(1)
    pool = BlockPool(3)
    with pytest.raises(ValueError, match=r"block_id must be in \[1, 2\], got 0"):
        pool.touch([NULL_BLOCK_ID])
    with pytest.raises(ValueError, match=r"block_id must be in \[1, 2\], got 3"):
        pool.free([3])


def test_refcount_block_returns_to_free_queue_after_last_holder():
    pool = BlockPool(4)
    [block_id] = pool.allocate(1)
    pool.touch([block_id])  # a second holder
    assert pool.blocks[block_id].ref_cnt == 2
    pool.free([block_id])
    assert pool.blocks[block_id].ref_cnt == 1
    assert block_id not in pool.free_block_ids()
    pool.free([block_id])
    assert pool.blocks[block_id].ref_cnt == 0
    assert pool.free_block_ids()[-1] == block_id
    with pytest.raises(ValueError, match="freed with ref_cnt 0"):
        pool.free([block_id])


def test_lru_eviction_order_follows_free_order():
    pool = BlockPool(5)
    first = pool.allocate(2)
    second = pool.allocate(2)
    pool.free(reversed(second))  # freed first -> evicted first, tail block before head block
    pool.free(reversed(first))
    expected_order = [second[1], second[0], first[1], first[0]]
    assert pool.free_block_ids() == expected_order
    assert pool.allocate(3) == expected_order[:3]


def test_freed_cached_block_stays_findable_until_evicted():
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    hash_a, hash_b = b"a" * 16, b"b" * 16
    assert pool.cache_block(a, hash_a) and pool.cache_block(b, hash_b)
    pool.free([b, a])
    assert pool.get_cached_block(hash_a) == a and pool.get_cached_block(hash_b) == b
    # Free queue is [3, b, a]: the never-cached block 3 goes first, then b is evicted.
    assert pool.allocate(1) == [3]
    assert pool.get_cached_block(hash_b) == b
    assert pool.allocate(1) == [b]
    assert pool.get_cached_block(hash_b) is None and pool.blocks[b].block_hash is None
    assert pool.get_cached_block(hash_a) == a
    assert pool.num_cached_blocks == 1


def test_cached_free_block_revived_from_middle_of_queue():
    pool = BlockPool(5)
    block_ids = pool.allocate(4)
    pool.cache_block(block_ids[1], b"h" * 16)
    pool.free(block_ids)
    assert pool.num_free_blocks == 4
    revived = pool.get_cached_block(b"h" * 16)
    pool.touch([revived])  # a prefix hit on a free block takes it out of the middle of the queue
    assert pool.blocks[revived].ref_cnt == 1 and revived not in pool.free_block_ids()
    assert pool.num_free_blocks == 3
    assert sorted(pool.allocate(3)) == sorted(set(block_ids) - {revived})
    assert pool.get_cached_block(b"h" * 16) == revived  # held, so never evicted


def test_duplicate_content_keeps_first_copy_and_reset_forgets_all():
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    assert pool.cache_block(a, b"x" * 16)
    assert not pool.cache_block(b, b"x" * 16)  # same content computed twice
    assert pool.get_cached_block(b"x" * 16) == a and pool.blocks[b].block_hash is None
    with pytest.raises(ValueError, match="must be held"):
        pool.cache_block(3, b"y" * 16)
    pool.free([a, b])
    assert pool.reset_prefix_cache() == 1
    assert pool.get_cached_block(b"x" * 16) is None and pool.blocks[a].block_hash is None
    assert pool.num_free_blocks == 3


def test_block_hashes_chain_and_skip_partial_block():
    tokens = list(range(10))
    hashes = block_hashes(tokens, 4)
    assert len(hashes) == 2  # 10 tokens = 2 full blocks + 2 leftover tokens
    assert hashes[0] == hash_block(ROOT_HASH, [0, 1, 2, 3])
    assert hashes[1] == hash_block(hashes[0], [4, 5, 6, 7])
    # Same block content after a different prefix hashes differently (the chain).
    assert block_hashes([9, 9, 9, 9, 4, 5, 6, 7], 4)[1] != hashes[1]
    # Resuming the chain gives the same tail.
    assert (
        block_hashes(tokens + [10, 11], 4, start_block=2, parent_hash=hashes[1])
        == block_hashes(tokens + [10, 11], 4)[2:]
    )
    assert block_hashes([1, 2, 3], 4) == []
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        block_hashes(tokens, 0)
    with pytest.raises(ValueError, match=r"token ids must be integers in \[0, 4294967295\], got -1"):
        block_hashes([1, -1], 2)


def test_block_hashes_are_identical_in_another_python_process():
    code = (
        "from shardserve.workers.kv_cache.prefix_hash import block_hashes;"
        "print(','.join(h.hex() for h in block_hashes(list(range(37)), 8)))"
    )
    # A different PYTHONHASHSEED proves the hash is not Python's salted hash().
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "123"},
    )
    assert result.stdout.strip() == ",".join(h.hex() for h in block_hashes(list(range(37)), 8))

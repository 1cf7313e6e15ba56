"""KVCacheManager: prefix hits on shared prefixes, the never-the-whole-sequence cap, shared
blocks with two holders, all-or-nothing allocation, hit statistics and reset."""

import pytest
from shardserve.workers.kv_cache.manager import KVCacheManager
from shardserve.workers.request import Request, SamplingParams

BLOCK_SIZE = 4


def make_request(request_id: str, prompt: list[int]) -> Request:
    return Request(request_id, prompt, SamplingParams(max_tokens=8))


def run_prefill(manager: KVCacheManager, request: Request) -> tuple[int, ...]:
    """Admit a request, 'compute' its whole prompt and register its full blocks."""
    computed = manager.get_computed_blocks(request)
    assert manager.allocate_slots(request, request.num_tokens - computed.num_computed_tokens, computed)
    request.num_computed_tokens = request.num_tokens
    manager.cache_full_blocks(request)
    return manager.get_block_ids(request.request_id)


def test_shared_prefix_hits_and_hit_rate():
    manager = KVCacheManager(num_blocks=16, block_size=BLOCK_SIZE)
    system = list(range(100, 108))  # two full blocks shared by both prompts
    first = make_request("a", system + [1, 2, 3])
    first_blocks = run_prefill(manager, first)
    assert len(first_blocks) == 3

    second = make_request("b", system + [7, 8, 9, 10, 11])
    computed = manager.get_computed_blocks(second)
    assert computed.block_ids == first_blocks[:2]
    assert computed.num_computed_tokens == 8
    assert manager.allocate_slots(second, second.num_tokens - 8, computed)
    second_blocks = manager.get_block_ids("b")
    assert second_blocks[:2] == first_blocks[:2] and len(second_blocks) == 4
    assert set(second_blocks[2:]).isdisjoint(first_blocks)

    stats = manager.prefix_cache_stats
    assert (stats.num_queried_tokens, stats.num_hit_tokens) == (11 + 13, 8)
    assert stats.hit_rate == pytest.approx(8 / 24)
    # A different first block breaks the chain: no hit, even though block 2 matches.
    third = make_request("c", [0, 0, 0, 0] + system[4:] + [5])
    assert manager.get_computed_blocks(third).num_computed_tokens == 0


def test_hit_never_covers_the_whole_sequence():
    manager = KVCacheManager(num_blocks=16, block_size=BLOCK_SIZE)
    prompt = list(range(12))  # exactly three full blocks
    run_prefill(manager, make_request("a", prompt))
    same = make_request("b", prompt)
    computed = manager.get_computed_blocks(same)
    # (12 - 1) // 4 = 2 blocks: the last token is recomputed so the model yields logits.
    assert computed.num_computed_tokens == 8 and len(computed.block_ids) == 2
    longer = make_request("c", prompt + [50])
    assert manager.get_computed_blocks(longer).num_computed_tokens == 12
    # A request asking for prompt logprobs must run every prompt position: no hit.
    wants_logprobs = Request("d", prompt + [50], SamplingParams(prompt_logprobs=1))
    assert manager.get_computed_blocks(wants_logprobs).num_computed_tokens == 0


def test_shared_block_reused_only_after_both_holders_free():
    manager = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)  # 3 usable blocks
    prompt = list(range(5))
    first = make_request("a", prompt)
    first_blocks = run_prefill(manager, first)
    second = make_request("b", prompt)
    run_prefill(manager, second)
    shared = first_blocks[0]
    assert manager.get_block_ids("b")[0] == shared
    assert manager.pool.blocks[shared].ref_cnt == 2
    assert manager.num_free_blocks == 0

    manager.free(first)
    assert manager.pool.blocks[shared].ref_cnt == 1
    assert manager.num_free_blocks == 1  # only a's private tail came back
    third = make_request("c", [90, 91, 92, 93, 94, 95])
    assert not manager.allocate_slots(third, 6)  # needs 2 blocks, 1 free: the shared one is still held
    manager.free(second)
    assert manager.pool.blocks[shared].ref_cnt == 0
    assert manager.num_free_blocks == 3
    manager.free(second)  # freeing twice is a no-op
    assert manager.num_free_blocks == 3


def test_free_puts_tail_blocks_first_in_eviction_order():
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    request = make_request("a", list(range(10)))
    block_ids = run_prefill(manager, request)
    manager.free(request)
    assert manager.pool.free_block_ids()[-3:] == list(reversed(block_ids))
    assert manager.get_block_ids("a") == ()


def test_failed_allocation_changes_nothing():
    manager = KVCacheManager(num_blocks=5, block_size=BLOCK_SIZE)  # 4 usable blocks
    holder = make_request("holder", list(range(8)))
    run_prefill(manager, holder)  # 2 blocks, both cached
    manager.free(holder)  # cached and free: still findable
    assert manager.allocate_slots(make_request("other", [70]), 1)  # holds the one never-used block
    request = make_request("r", list(range(8)) + list(range(20, 28)))  # 16 tokens = 4 blocks
    computed = manager.get_computed_blocks(request)
    assert computed.num_computed_tokens == 8
    free_before = manager.pool.free_block_ids()
    assert len(free_before) == 3
    # 2 new blocks would fit in 3 free ones, but the 2 hit blocks are free too: 2 + 2 > 3.
    assert not manager.allocate_slots(request, 8, computed)
    assert manager.get_block_ids("r") == ()
    assert manager.pool.free_block_ids() == free_before
    assert all(manager.pool.blocks[b].ref_cnt == 0 for b in free_before)
    assert manager.prefix_cache_stats.num_queried_tokens == 8 + 1  # failed lookups are not counted
    # A smaller first chunk fits: 2 revived + 1 new block.
    assert manager.allocate_slots(request, 4, computed)
    assert manager.get_block_ids("r")[:2] == computed.block_ids
    assert manager.num_free_blocks == 0
    assert manager.prefix_cache_stats.num_hit_tokens == 8


def test_growth_by_decode_and_output_blocks_get_cached():
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    request = make_request("a", [1, 2, 3])
    assert manager.allocate_slots(request, 3)
    request.num_computed_tokens = 3
    assert len(manager.get_block_ids("a")) == 1
    request.append_output_token(4)  # the sampled token fills block 0 once it is computed
    assert manager.allocate_slots(request, 1)
    assert len(manager.get_block_ids("a")) == 1
    request.num_computed_tokens = 4
    assert manager.cache_full_blocks(request) == 1
    request.append_output_token(5)
    assert manager.allocate_slots(request, 1)
    assert len(manager.get_block_ids("a")) == 2
    follower = make_request("b", [1, 2, 3, 4, 9])
    assert manager.get_computed_blocks(follower).block_ids == manager.get_block_ids("a")[:1]
    with pytest.raises(ValueError, match="num_new_tokens must be >= 0"):
        manager.allocate_slots(request, -1)


def test_prefix_caching_disabled_never_hits():
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE, enable_prefix_caching=False)
    run_prefill(manager, make_request("a", list(range(9))))
    assert manager.pool.num_cached_blocks == 0
    assert manager.get_computed_blocks(make_request("b", list(range(9)))).num_computed_tokens == 0
    assert manager.prefix_cache_stats.num_queried_tokens == 0


def test_reset_prefix_cache_drops_hashes_and_stats():
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    first = make_request("a", list(range(9)))
    run_prefill(manager, first)
    run_prefill(manager, make_request("b", list(range(9))))
    assert manager.prefix_cache_stats.num_hit_tokens == 8
    manager.free(first)
    assert manager.reset_prefix_cache() == 2
    assert manager.prefix_cache_stats.num_queried_tokens == 0 and manager.prefix_cache_stats.hit_rate == 0.0
    assert manager.get_computed_blocks(make_request("c", list(range(9)))).num_computed_tokens == 0
    assert manager.usage == pytest.approx(3 / 7)  # b still holds its 3 blocks

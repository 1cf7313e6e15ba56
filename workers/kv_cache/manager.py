"""KV cache manager: each request's block table, on top of a BlockPool and the prefix cache.

Data flow, per request and step (driven by the scheduler):
1. `get_computed_blocks(request)` (first allocation only) hashes the request's full blocks and
   returns the longest leading run found in the cache, as a `ComputedBlocks`. It never covers
   the last token: the model must run at least that token to produce logits.
2. `allocate_slots(request, num_new_tokens, computed)` grows the block table so it covers
   `request.num_computed_tokens + computed.num_computed_tokens + num_new_tokens` tokens. On the
   first allocation it takes a holder on the computed (hit) blocks, then appends fresh blocks.
   It is all-or-nothing: when the pool (free blocks, counting evictable cached ones) is too
   small it returns False and changes nothing, and the scheduler preempts or waits.
3. The runner computes the tokens; the scheduler advances `request.num_computed_tokens`, then
   `cache_full_blocks(request)` registers the hashes of blocks that became full of computed
   tokens. Registration waits until the K/V are written (rather than at allocation, as vLLM
   does) so a block is never found by another request while its K/V are still being computed.
4. `free(request)` drops the request's holders, tail block first, so a shared prompt prefix
   outlives the request's own tail in the LRU free queue.
Hit statistics are counted when a lookup is used by a successful first allocation, so a
request that waits several steps for blocks is counted once per admission.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardserve.workers.kv_cache.block_pool import BlockPool
from shardserve.workers.kv_cache.prefix_hash import ROOT_HASH, block_hashes
from shardserve.workers.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class ComputedBlocks:
    """Leading blocks of a request found in the prefix cache."""

    block_ids: tuple[int, ...] = ()
    num_computed_tokens: int = 0  # = len(block_ids) * block_size


NO_COMPUTED_BLOCKS = ComputedBlocks()


@dataclass(frozen=True)
class PrefixCacheStats:
    """Prefix cache lookups in tokens, since construction or the last reset."""

    num_queried_tokens: int = 0
    num_hit_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self._block_ids: dict[str, list[int]] = {}  # request id -> block table
        # request id -> hashes of its full blocks so far (prompt and output tokens only grow,
        # so the chain is extended, never recomputed).
        self._hashes: dict[str, list[bytes]] = {}
        self._num_registered: dict[str, int] = {}  # request id -> leading blocks already in the cache
        self._num_queried_tokens = 0
        self._num_hit_tokens = 0

    # ---- counters -------------------------------------------------------------------------

    @property
    def num_usable_blocks(self) -> int:
        return self.pool.num_usable_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(self._num_queried_tokens, self._num_hit_tokens)

    def get_block_ids(self, request_id: str, start: int = 0) -> tuple[int, ...]:
        """The request's block table from index `start` on (the whole table by default)."""
        block_ids = self._block_ids.get(request_id, ())
        return tuple(block_ids[start:]) if start < len(block_ids) else ()  # () mostly: no slice built

    def num_blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    # ---- per-request lifecycle --------------------------------------------------------------

    def get_computed_blocks(self, request: Request) -> ComputedBlocks:
        """Longest leading run of the request's full blocks found in the prefix cache."""
        if not self.enable_prefix_caching or request.request_id in self._block_ids:
            return NO_COMPUTED_BLOCKS
        if request.sampling_params.prompt_logprobs is not None:
            return NO_COMPUTED_BLOCKS  # every prompt position must run to yield its logprobs
        # At most (num_tokens - 1) // block_size blocks: the last token is always computed.
        max_num_blocks = (request.num_tokens - 1) // self.block_size
        hashes = self._full_block_hashes(request)
        block_ids: list[int] = []
        for block_hash in hashes[:max_num_blocks]:
            block_id = self.pool.get_cached_block(block_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
        return ComputedBlocks(tuple(block_ids), len(block_ids) * self.block_size)

    def allocate_slots(
        self, request: Request, num_new_tokens: int, computed: ComputedBlocks = NO_COMPUTED_BLOCKS
    ) -> bool:
        """Make the block table cover the request's computed tokens, `computed`'s hit tokens and
        `num_new_tokens` more. `computed` is only accepted on the first allocation. Returns False
        (and changes nothing) when the pool cannot supply the blocks."""
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        request_id = request.request_id
        num_tokens = request.num_computed_tokens + computed.num_computed_tokens + num_new_tokens
        held = self._block_ids.get(request_id)
        if held is not None:
            if computed.block_ids:
                raise ValueError(f"request {request_id!r} already holds blocks; computed blocks must be empty")
            # A decode step mostly needs no block: only one that crosses a block boundary does.
            num_new_blocks = -(-num_tokens // self.block_size) - len(held)  # cdiv, inlined
            return num_new_blocks <= 0 or self._append_blocks(held, num_new_blocks)
        num_new_blocks = max(0, self.num_blocks_for(num_tokens) - len(computed.block_ids))
        # Hit blocks nobody holds sit in the free queue: taking them uses up free blocks too.
        num_revived = sum(1 for block_id in computed.block_ids if self.pool.blocks[block_id].ref_cnt == 0)
        if num_new_blocks + num_revived > self.pool.num_free_blocks:
            return False
        self.pool.touch(computed.block_ids)
        self._num_registered[request_id] = len(computed.block_ids)
        if self.enable_prefix_caching:
            self._num_queried_tokens += request.num_tokens
            self._num_hit_tokens += computed.num_computed_tokens
        self._block_ids[request_id] = list(computed.block_ids) + self.pool.allocate(num_new_blocks)
        return True

    def _append_blocks(self, held: list[int], num_new_blocks: int) -> bool:
        """Append `num_new_blocks` fresh blocks to a held table; False (nothing taken) if the
        pool has too few."""
        if num_new_blocks > self.pool.num_free_blocks:
            return False
        held.extend(self.pool.allocate(num_new_blocks))
        return True

    def cache_full_blocks(self, request: Request) -> int:
        """Register the blocks that are full of computed tokens; returns how many were new."""
        request_id = request.request_id
        block_ids = self._block_ids.get(request_id)
        if block_ids is None or not self.enable_prefix_caching:
            return 0
        num_registered = self._num_registered[request_id]  # <= len(block_ids): registered blocks are held
        num_full = request.num_computed_tokens // self.block_size
        if num_full <= num_registered:  # most steps: no block filled up since the last call
            return 0
        num_full = min(num_full, len(block_ids))
        hashes = self._full_block_hashes(request)
        for index in range(num_registered, num_full):
            # False means an identical block was cached first; this copy stays private.
            self.pool.cache_block(block_ids[index], hashes[index])
        self._num_registered[request_id] = num_full
        return num_full - num_registered

    def free(self, request: Request) -> None:
        """Return every block the request holds (no-op if it holds none)."""
        request_id = request.request_id
        block_ids = self._block_ids.pop(request_id, [])
        self.pool.free(reversed(block_ids))
        self._hashes.pop(request_id, None)
        self._num_registered.pop(request_id, None)

    def reset_prefix_cache(self) -> int:
        """Forget every cached hash and zero the hit statistics; returns the blocks dropped."""
        self._num_queried_tokens = 0
        self._num_hit_tokens = 0
        return self.pool.reset_prefix_cache()

    def _full_block_hashes(self, request: Request) -> list[bytes]:
        hashes = self._hashes.setdefault(request.request_id, [])
        num_full = request.num_tokens // self.block_size
        if len(hashes) < num_full:
            parent = hashes[-1] if hashes else ROOT_HASH
            hashes.extend(block_hashes(request.all_token_ids, self.block_size, len(hashes), parent))
        return hashes

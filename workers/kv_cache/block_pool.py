"""Reference-counted pool of KV cache blocks with an LRU free queue and a hash -> block map.

Data flow: the KV cache manager asks `allocate(n)` for fresh blocks; they come from the front
of the free queue (least recently freed first). Blocks a request finds in the prefix cache are
`touch`ed instead: their reference count goes up and, if nobody held them, they leave the free
queue from wherever they sit (an OrderedDict gives O(1) removal from the middle). `free`
lowers reference counts; a block whose count reaches zero goes to the back of the free queue
but keeps its hash, so it stays findable through `get_cached_block` until `allocate` takes it
again, which is when its hash leaves the map (eviction). Block 0 is the null block: it is
never handed out, so the runner can pad block tables (and CUDA graph inputs) with it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

NULL_BLOCK_ID = 0


@dataclass
class KVBlock:
    """Bookkeeping of one block; its K/V live in the runner's cache tensor at index block_id."""

    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None  # set while the block holds a full, registered block


class BlockPool:
    """Blocks 1..num_blocks-1 are usable; block 0 (NULL_BLOCK_ID) is reserved."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise ValueError(
                f"num_blocks must be >= 2 (block 0 is the reserved null block), got {num_blocks}"
            )
        self.num_blocks = num_blocks
        self.blocks = [KVBlock(block_id) for block_id in range(num_blocks)]
        # block id -> None; front = next to evict. Holds exactly the usable blocks with ref_cnt 0.
        self._free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))
        self._cached: dict[bytes, int] = {}  # block hash -> block id (in use or free)

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks nobody holds, including cached ones that allocation may evict."""
        return len(self._free_queue)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of usable blocks held by at least one request, in [0, 1]."""
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def free_block_ids(self) -> list[int]:
        """Free blocks in eviction order (front first); for tests and debugging."""
        return list(self._free_queue)

    def allocate(self, num_blocks: int) -> list[int]:
        """Take `num_blocks` blocks from the front of the free queue, evicting their hashes."""
        if not 0 <= num_blocks <= self.num_free_blocks:
            raise ValueError(
                f"num_blocks must be in [0, {self.num_free_blocks}] (free blocks), got {num_blocks}"
            )
        block_ids = []
        for _ in range(num_blocks):
            block_id, _ = self._free_queue.popitem(last=False)
            block = self.blocks[block_id]
            self._evict_hash(block)
            block.ref_cnt = 1
            block_ids.append(block_id)
        return block_ids

    def touch(self, block_ids: Iterable[int]) -> None:
        """Add a holder to each block (a prefix hit); a free one leaves the free queue, hash kept."""
        for block_id in block_ids:
            block = self._usable(block_id)
            if block.ref_cnt == 0:
                del self._free_queue[block_id]
            block.ref_cnt += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one holder of each block; blocks nobody holds join the back of the free queue
        in the order given (callers pass a request's blocks tail first, so tails evict first)."""
        for block_id in block_ids:
            block = self._usable(block_id)
            if block.ref_cnt < 1:
                raise ValueError(f"block {block_id} freed with ref_cnt {block.ref_cnt}, must be >= 1")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free_queue[block_id] = None

    def get_cached_block(self, block_hash: bytes) -> int | None:
        """The block holding the full block with this hash, if it has not been evicted."""
        return self._cached.get(block_hash)

    def cache_block(self, block_id: int, block_hash: bytes) -> bool:
        """Register a held, now full block under its hash. Returns False when another block
        already holds the same content (two requests computed it at once): the first copy
        stays the one found, and this block stays unhashed and is simply reused when freed."""
        block = self._usable(block_id)
        if block.ref_cnt < 1:
            raise ValueError(
                f"block {block_id} must be held (ref_cnt >= 1) to be cached, got {block.ref_cnt}"
            )
        if block.block_hash is not None:
            return block.block_hash == block_hash
        if block_hash in self._cached:
            return False
        block.block_hash = block_hash
        self._cached[block_hash] = block_id
        return True

    def reset_prefix_cache(self) -> int:
        """Forget every hash (held blocks stay held, they are just no longer findable).
        Returns the number of cached blocks dropped."""
        num_dropped = len(self._cached)
        for block_id in self._cached.values():
            self.blocks[block_id].block_hash = None
        self._cached.clear()
        return num_dropped

    def _evict_hash(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            del self._cached[block.block_hash]
            block.block_hash = None

    def _usable(self, block_id: int) -> KVBlock:
        if not 1 <= block_id < self.num_blocks:
            raise ValueError(f"block_id must be in [1, {self.num_blocks - 1}], got {block_id}")
        return self.blocks[block_id]

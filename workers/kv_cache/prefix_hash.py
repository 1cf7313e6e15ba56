"""Chained content hashes of full KV blocks, the keys of the prefix cache.

Data flow: token ids of a sequence are cut into blocks of `block_size`; only full blocks are
hashed. Block i's hash covers its parent's hash (block i-1, or a fixed root for block 0) and
its own token ids, so one hash names the whole prefix up to the end of the block: two
sequences share block i's KV exactly when their hashes of block i are equal. The KV cache
manager uses these hashes to find cached blocks; the request router computes the same hashes
from token ids (in another process) to send a request to the replica that holds its prefix,
so the hash must not depend on the process: it is blake2b over a fixed little-endian encoding,
never Python's salted `hash()`.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

# 16 bytes: collisions are negligible (2^-64 birthday bound at 2^32 blocks) and keys stay small.
HASH_NUM_BYTES = 16
# Parent of block 0. A named constant (not b"") so a different scheme can never collide with it.
ROOT_HASH = hashlib.blake2b(b"shardserve-prefix-root-v1", digest_size=HASH_NUM_BYTES).digest()
# Token ids are non-negative and vocabularies are far below 2^32: 4 bytes each.
_MAX_TOKEN_ID = 2**32 - 1


def hash_block(parent_hash: bytes, token_ids: Sequence[int]) -> bytes:
    """Hash of one full block given its parent's hash (ROOT_HASH for the first block)."""
    try:
        encoded = struct.pack(f"<{len(token_ids)}I", *token_ids)
    except struct.error as exc:
        bad = next((t for t in token_ids if not isinstance(t, int) or not 0 <= t <= _MAX_TOKEN_ID), None)
        raise ValueError(f"token ids must be integers in [0, {_MAX_TOKEN_ID}], got {bad!r}") from exc
    hasher = hashlib.blake2b(parent_hash, digest_size=HASH_NUM_BYTES)
    hasher.update(encoded)
    return hasher.digest()


def block_hashes(
    token_ids: Sequence[int], block_size: int, start_block: int = 0, parent_hash: bytes = ROOT_HASH
) -> list[bytes]:
    """Chained hashes of the full blocks of `token_ids` (a trailing partial block is skipped).

    `start_block` and `parent_hash` resume a chain: pass the number of blocks already hashed
    and the last of their hashes to hash only the blocks that became full since.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if start_block < 0:
        raise ValueError(f"start_block must be >= 0, got {start_block}")
    hashes: list[bytes] = []
    parent = parent_hash
    num_full_blocks = len(token_ids) // block_size
    for block_index in range(start_block, num_full_blocks):
        start = block_index * block_size
        parent = hash_block(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes

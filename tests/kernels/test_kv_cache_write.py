"""KV-cache write kernel vs its torch reference: strided k/v views, shuffled slots, padding slots."""

from __future__ import annotations

import pytest
import torch
from kernel_env import ELEMENTWISE_DTYPES
from shardserve.workers.kernels import reference
from shardserve.workers.kernels.kv_cache_write import kv_cache_write


@pytest.mark.parametrize("dtype", ELEMENTWISE_DTYPES)
@pytest.mark.parametrize("num_kv_heads,head_dim,block_size", [(2, 32, 16), (3, 64, 8), (1, 16, 4)])
def test_kv_cache_write_matches_reference(device, dtype, num_kv_heads, head_dim, block_size):
    num_tokens, num_q_heads, num_blocks = 11, 4, 6
    # k and v are strided views into a fused qkv projection output, as the model produces them.
    qkv = torch.randn(num_tokens, (num_q_heads + 2 * num_kv_heads) * head_dim).to(dtype=dtype, device=device)
    k = qkv[:, num_q_heads * head_dim : (num_q_heads + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, head_dim)
    v = qkv[:, (num_q_heads + num_kv_heads) * head_dim :].view(num_tokens, num_kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size)[:num_tokens]
    slots[4] = -1  # a padding token: must not be written anywhere
    slot_mapping = slots.to(device=device, dtype=torch.int64)
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim).to(dtype=dtype, device=device)
    expected = cache.clone()
    before = cache.clone()

    kv_cache_write(k, v, cache, slot_mapping)
    reference.kv_cache_write(k, v, expected, slot_mapping)

    assert torch.equal(cache, expected)
    flat = cache.view(2, num_blocks * block_size, num_kv_heads, head_dim)
    written = slots[slots >= 0].to(device)
    assert torch.equal(flat[0, written], k[slots >= 0])  # K lands at its slot, V beside it
    assert torch.equal(flat[1, written], v[slots >= 0])
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool, device=device)
    untouched[written] = False
    assert torch.equal(flat[:, untouched], before.view_as(flat)[:, untouched])


def test_kv_cache_write_int32_slots_and_shape_errors(device):
    k = torch.randn(3, 2, 16, device=device)
    cache = torch.zeros(2, 2, 4, 2, 16, device=device)
    kv_cache_write(k, -k, cache, torch.tensor([7, 0, 5], dtype=torch.int32, device=device))
    assert torch.equal(cache[0, 1, 3], k[0]) and torch.equal(cache[1, 1, 1], -k[2])
    with pytest.raises(ValueError, match="kv_cache heads x dim"):
        kv_cache_write(k, k, torch.zeros(2, 2, 4, 1, 16, device=device), torch.zeros(3, dtype=torch.int64, device=device))

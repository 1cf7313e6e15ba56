"""Sizes and allocates the paged KV cache from a memory budget.

CPU: the pool is `cache.cpu_kv_cache_bytes` big. GPU: the engine may use
`gpu_memory_utilization` of the card's total memory; after the weights are loaded, one
profiling forward at the largest step size (`max_num_batched_tokens`) measures peak
activation memory, `reserve_bytes` is set aside (the decode CUDA graphs' memory pool, which
is captured after the pool exists), and the KV pool gets what remains. An explicit `cache.num_blocks`
overrides both (tests use tiny pools to force preemption). Block 0 is the null block
(padding target), so a pool always has at least 2 blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from shardserve.workers.config import EngineConfig


@dataclass(frozen=True)
class KVCacheLayout:
    """The allocated KV pool's layout on this rank: the model's KVCacheSpec (models/interface.py:
    layers, KV heads, head size) plus the block size and the dtype of the cache tensors."""

    num_layers: int
    num_kv_heads: int  # per rank
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        element_size = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * element_size

    @classmethod
    def of_model(cls, model: torch.nn.Module, block_size: int) -> KVCacheLayout:
        spec = model.kv_cache_spec
        dtype = next(model.parameters()).dtype
        return cls(spec.num_layers, spec.num_kv_heads, spec.head_dim, block_size, dtype)


def determine_num_blocks(
    spec: KVCacheLayout, config: EngineConfig, device: torch.device, profile_forward: Callable[[int], None],
    reserve_bytes: Callable[[], int] | None = None,
) -> int:
    cache = config.cache
    if cache.num_blocks is not None:
        return max(cache.num_blocks, 2)
    if device.type != "cuda":
        num_blocks = cache.cpu_kv_cache_bytes // spec.bytes_per_block
    else:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        profile_forward(config.scheduler.max_num_batched_tokens)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.empty_cache()
        _, total = torch.cuda.mem_get_info(device)
        # Memory other processes hold is not ours to take: budget against what we measured.
        reserve = reserve_bytes() if reserve_bytes is not None else 0
        budget = int(total * cache.gpu_memory_utilization) - peak - reserve
        num_blocks = budget // spec.bytes_per_block
    if num_blocks < 2:
        raise ValueError(
            f"KV cache budget too small: one block needs {spec.bytes_per_block} bytes; raise "
            f"cache.cpu_kv_cache_bytes / gpu_memory_utilization (got {cache.cpu_kv_cache_bytes} / "
            f"{cache.gpu_memory_utilization})"
        )
    return int(num_blocks)


def allocate_kv_caches(spec: KVCacheLayout, num_blocks: int, device: torch.device) -> list[torch.Tensor]:
    # One tensor per layer: [2 (K, V), num_blocks, block_size, num_kv_heads, head_dim]
    shape = (2, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
    return [torch.zeros(shape, dtype=spec.dtype, device=device) for _ in range(spec.num_layers)]

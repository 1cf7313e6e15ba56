"""The attention seam between model layers and the paged KV cache.

A model layer projects this step's tokens to q, k, v (rope applied) and calls
`backend.forward(q, k, v, kv_cache, metadata, scale)`. The backend first writes k and v into the
layer's cache at `metadata.slot_mapping` (unless the caller says `kv_written=True`: on CUDA the
rotary kernel stores them while it rotates k, saving a launch per layer), then lets every query attend causally over its
request's whole context: the cached prefix plus this step's tokens up to and including its own
position. The batch may mix decode rows (query_len 1) and prefill chunks with a cached prefix.
Backends are looked up by name (`get_attention_backend`); `torch` is the reference
implementation (torch_ref.py), and faster kernels plug in under other names: `triton` on CUDA,
`cpu` (fused C++ decode attention, torch reference for long prefills) on CPU.
"""

from __future__ import annotations

from typing import Protocol

import torch
from shardserve.workers.attention.metadata import AttentionMetadata


class AttentionBackend(Protocol):
    name: str

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                metadata: AttentionMetadata, scale: float, kv_written: bool = False) -> torch.Tensor:
        """Write k/v into the cache, attend, return [num_tokens, num_heads, head_dim].

        q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim];
        kv_cache: [2, num_blocks, block_size, num_kv_heads, head_dim] (0 = K, 1 = V).
        num_heads must be a multiple of num_kv_heads (grouped-query attention).
        """
        ...


ATTENTION_BACKENDS = ("torch", "triton", "cpu")


def get_attention_backend(name: str) -> AttentionBackend:
    """The backend registered under `name` (one of ATTENTION_BACKENDS)."""
    if name == "torch":
        from shardserve.workers.attention.torch_ref import TorchAttentionBackend

        return TorchAttentionBackend()
    if name == "triton":
        from shardserve.workers.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    if name == "cpu":
        from shardserve.workers.attention.cpu_backend import CpuAttentionBackend

        return CpuAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r}; available: {ATTENTION_BACKENDS}")

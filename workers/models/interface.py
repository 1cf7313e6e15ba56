"""What every model in this folder offers the model runner.

The runner sizes the KV cache from `model.kv_cache_spec`, allocates one tensor per layer
`[2, num_blocks, block_size, num_kv_heads, head_dim]`, and each step calls
`forward(input_ids, positions, kv_caches, attn_metadata)` for hidden states and then
`compute_logits` on the rows it samples. `load_weights` takes Hugging Face-named tensors.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
from shardserve.workers.attention.metadata import AttentionMetadata


@dataclass(frozen=True)
class KVCacheSpec:
    """Shape of this rank's KV cache.

    num_layers: decoder layers held by this rank (one cache tensor each).
    num_kv_heads: KV heads per rank (after tensor-parallel split or replication).
    head_dim: size of one head.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int

    def bytes_per_block(self, block_size: int, dtype: torch.dtype) -> int:
        """Bytes of one KV block over all layers (K and V)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * block_size * self.num_kv_heads * self.head_dim * itemsize


class CausalLM(Protocol):
    kv_cache_spec: KVCacheSpec

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata, hidden_in: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions: [num_tokens] -> hidden states [num_tokens, hidden_size]. Under
        pipeline parallelism a stage after the first starts from `hidden_in` (the previous
        stage's output) and a stage before the last returns its residual stream."""
        ...

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[num_rows, hidden_size] -> logits [num_rows, vocab_size] (no vocab padding) in the
        model's dtype: consumers that need float32 widen them (sampler, logprobs)."""
        ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load Hugging Face-named tensors; returns the names that were consumed."""
        ...

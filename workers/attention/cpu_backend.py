"""CPU attention: one fused C++ call per layer for decode-size steps, the torch reference otherwise.

Data flow: for steps whose longest query is at most `FUSED_MAX_QUERY_LEN` tokens (decode, short
extends), this step's k/v are stored into the paged cache (unless the rotary op already did) and
`decode_ops.paged_attention` lets each query attend causally over its request's context through
the block table, walking the cache in place: no gathered copy of the context, no mask tensor, no
padding (the torch reference builds all three, ~20 eager ops a layer). Longer prefills go to the
torch reference (torch_ref.py), whose one SDPA call is the faster kernel at that size. The model
runner picks this backend on CPU when the extension builds (decode_ops.wanted).
"""

from __future__ import annotations

import torch
from shardserve.workers.attention.metadata import AttentionMetadata
from shardserve.workers.attention.torch_ref import TorchAttentionBackend, write_kv_cache
from shardserve.workers.quant.cpu_kernels import decode_ops

FUSED_MAX_QUERY_LEN = 32


class CpuAttentionBackend:
    name = "cpu"

    def __init__(self) -> None:
        self.reference = TorchAttentionBackend()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                metadata: AttentionMetadata, scale: float, kv_written: bool = False) -> torch.Tensor:
        if (metadata.max_query_len > FUSED_MAX_QUERY_LEN or not decode_ops.wanted(q)
                or kv_cache.dtype != torch.float32 or not kv_cache.is_contiguous()):
            return self.reference.forward(q, k, v, kv_cache, metadata, scale, kv_written)
        if not kv_written:
            write_kv_cache(k, v, kv_cache, metadata.slot_mapping)
        return decode_ops.ops().paged_attention(  # [num_tokens, num_heads, head_dim]
            q, kv_cache, metadata.block_tables.to(torch.int32).contiguous(), metadata.seq_lens.to(torch.int32),
            metadata.query_start_loc.to(torch.int32), scale)

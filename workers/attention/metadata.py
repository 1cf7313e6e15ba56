"""Per-step attention metadata, built by the model runner from a SchedulerOutput.

The batch is flattened: this step's tokens of every request are concatenated
(`num_tokens` in all); request i owns tokens `query_start_loc[i]:query_start_loc[i+1]`.
Its context after the step is `seq_lens[i]` tokens, the first `seq_lens[i] - query_len`
of them already cached. The KV cache of one layer is one tensor
`[2, num_blocks, block_size, num_kv_heads, head_dim]` (index 0 = K, 1 = V); token t of a
request lives in block `block_tables[i, t // block_size]` at offset `t % block_size`, and
`slot_mapping[j] = block * block_size + offset` is where token j's new K/V is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    num_tokens: int
    num_requests: int
    query_start_loc: torch.Tensor  # [num_requests + 1] int32, on the model's device
    seq_lens: torch.Tensor  # [num_requests] int32, context length after this step
    block_tables: torch.Tensor  # [num_requests, max_num_blocks] int32, padded with 0
    slot_mapping: torch.Tensor  # [num_tokens] int64
    max_query_len: int
    max_seq_len: int
    # Host copies for backends that loop or pad on the CPU side.
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    # Per-step scratch a backend derives from the tensors above on the first layer and reuses in
    # the others (the Triton extend kernel's work list); inside a CUDA graph it is captured too.
    backend_cache: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1

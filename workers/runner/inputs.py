"""Turns a SchedulerOutput into the flat tensors one forward pass needs.

The step's tokens of every scheduled request are concatenated in batch order (decodes first,
then prefill chunks, as the scheduler lists them). Positions restart at each request's
`start_position`; `slot_mapping` says where each new token's K/V goes in the paged cache.
Everything is built on the host in plain Python lists and copied to the device once per
tensor (pinned + non_blocking on CUDA), so the cost is one small copy per step, not per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from shardserve.workers.attention.metadata import AttentionMetadata
from shardserve.workers.step_types import SchedulerOutput


@dataclass
class ModelInputs:
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    attn_metadata: AttentionMetadata
    # Row in the flat token batch of each request's last token this step (for sampling).
    last_token_rows: list[int]


def _to_device(values: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host


def build_model_inputs(sched: SchedulerOutput, block_size: int, device: torch.device) -> ModelInputs:
    """Inputs of a step whose requests are all new to the runner (profiling, teacher forcing), so
    each one's `new_block_ids` is its whole block table."""
    input_ids: list[int] = []
    positions: list[int] = []
    slot_mapping: list[int] = []
    query_start_loc = [0]
    seq_lens: list[int] = []
    query_lens: list[int] = []
    last_token_rows: list[int] = []
    # Requests seen for the first time: new_block_ids is each one's whole table.
    max_num_blocks = max(len(r.new_block_ids) for r in sched.scheduled)
    block_table_rows: list[int] = []

    for req in sched.scheduled:
        start = req.start_position
        input_ids.extend(req.token_ids)
        positions.extend(range(start, start + req.num_tokens))
        blocks = req.new_block_ids
        slot_mapping.extend(blocks[p // block_size] * block_size + p % block_size for p in range(start, req.seq_len))
        query_start_loc.append(query_start_loc[-1] + req.num_tokens)
        last_token_rows.append(query_start_loc[-1] - 1)
        seq_lens.append(req.seq_len)
        query_lens.append(req.num_tokens)
        block_table_rows.extend(blocks)
        block_table_rows.extend([0] * (max_num_blocks - len(blocks)))  # 0 = the null block

    num_requests = len(sched.scheduled)
    metadata = AttentionMetadata(
        num_tokens=len(input_ids),
        num_requests=num_requests,
        query_start_loc=_to_device(query_start_loc, torch.int32, device),
        seq_lens=_to_device(seq_lens, torch.int32, device),
        block_tables=_to_device(block_table_rows, torch.int32, device).view(num_requests, max_num_blocks),
        slot_mapping=_to_device(slot_mapping, torch.int64, device),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_lens_cpu=query_lens,
        seq_lens_cpu=seq_lens,
    )
    return ModelInputs(
        input_ids=_to_device(input_ids, torch.int64, device),
        positions=_to_device(positions, torch.int64, device),
        attn_metadata=metadata,
        last_token_rows=last_token_rows,
    )

"""Pipeline parallelism: which decoder layers a stage holds and how activations cross stages.

The decoder layers are split into contiguous ranges, one per stage (evenly, the first stages
taking one more when the count does not divide, or as `ParallelState.pp_layer_partition` says).
A model keeps a full-length layer list in which the layers of other stages are `PPMissingLayer`
(no parameters), so checkpoint names keep their global layer index. In one step the first stage
embeds the tokens and runs its layers; every stage but the last returns its residual stream
`[num_tokens, hidden]`, which the model runner sends to the next stage (`send_hidden`); that
stage's runner receives it (`recv_hidden`, the shape known from the step's token count), and the
last stage normalises, computes logits and samples. Send and receive stay outside the model's
forward so that each stage's forward is captured in CUDA graphs like a single-GPU model's. At a
boundary the stage adds (MLP output, residual) once, so one tensor crosses it.

Micro-batches: the engine keeps up to ParallelConfig.pipeline_depth steps (disjoint request sets)
in flight, and every stage runs them in the same order, so stage s computes step k+1 while stage
s+1 computes step k. Nothing here depends on how many: each received activation is a fresh tensor
and each sent one a copy held until its send completes. `send_hidden` posts the send and completes
the previous one first (parallel/comm.py says why this cannot deadlock); `recv_hidden` blocks
until the step's activations have arrived.
"""

from __future__ import annotations

import torch
from shardserve.parallel.comm import recv_from_prev_stage, send_to_next_stage
from shardserve.parallel.state import get_parallel_state
from torch import nn


def partition_layers(num_layers: int, pp_size: int, partition: tuple[int, ...] | None = None) -> list[int]:
    """Decoder layers per stage: `partition` if given (validated), else as even as possible."""
    if partition is not None:
        if len(partition) != pp_size or sum(partition) != num_layers or min(partition) < 1:
            raise ValueError(f"pp_layer_partition {partition} must list {pp_size} positive layer counts "
                             f"summing to num_hidden_layers = {num_layers}")
        return list(partition)
    if num_layers < pp_size:
        raise ValueError(f"pipeline_parallel_size {pp_size} exceeds the model's {num_layers} layers")
    base, extra = divmod(num_layers, pp_size)
    return [base + (1 if s < extra else 0) for s in range(pp_size)]


def layer_range(num_layers: int) -> tuple[int, int]:
    """[start, end) of the global decoder layers this process's stage holds."""
    state = get_parallel_state()
    counts = partition_layers(num_layers, state.pp_size, state.pp_layer_partition)
    start = sum(counts[: state.pp_rank])
    return start, start + counts[state.pp_rank]


class PPMissingLayer(nn.Module):
    """Placeholder for a layer held by another pipeline stage (no parameters, never called)."""

    def forward(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError("this layer lives on another pipeline stage")


def send_hidden(hidden_states: torch.Tensor) -> None:
    """Send this stage's residual stream [num_tokens, hidden] to the next stage (asynchronous:
    the tensor is kept until the send completes and must not be modified)."""
    send_to_next_stage(hidden_states)


def recv_hidden(num_tokens: int, hidden_size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Receive the previous stage's residual stream: [num_tokens, hidden_size]."""
    return recv_from_prev_stage((num_tokens, hidden_size), dtype, device)

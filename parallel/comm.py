"""Collectives: the only torch.distributed calls of a forward pass and of the worker loop.

Tensor parallel: row-parallel layers and the vocab-parallel embedding sum their partial results
with `tensor_model_parallel_all_reduce` (or, where the sum feeds a residual-add RMSNorm, with
`tensor_model_parallel_all_reduce_rmsnorm`: the reduction and the norm in one kernel); the LM
head concatenates its vocab shards with `tensor_model_parallel_all_gather`. Pipeline parallel:
a stage hands its activations to the same TP column of the next stage with `send_to_next_stage`
/ `recv_from_prev_stage`.
Expert parallel: `expert_all_to_all` moves routed token rows between the ranks of an EP group
and `expert_all_gather` reassembles the token slices. Host side: `broadcast_object` sends a
picklable object (a step's SchedulerOutput) from one rank to all over the gloo CPU group and
`cpu_all_reduce_min` agrees on an integer (the KV block count). Every function reads its group
from `get_parallel_state()` and is the identity (or a plain copy) when that group has one rank.
"""

from __future__ import annotations

import pickle
from typing import Any

import torch
import torch.distributed as dist
from shardserve.parallel.state import get_parallel_state


def tensor_model_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the TP group in place and return it; identity at TP size 1.

    Small CUDA messages (decode) take the group's symmetric-memory all-reduce when it is set up
    (parallel/custom_allreduce.py); everything else, and every message without it, takes NCCL.
    """
    state = get_parallel_state()
    tp = state.tp
    if tp.size == 1:
        return x
    custom = state.tp_custom_allreduce
    if custom is not None:
        algorithm = custom.algorithm_for(x)
        if algorithm is not None:
            return custom.all_reduce_(x, algorithm)
    dist.all_reduce(x, group=tp.group)
    return x


def tensor_model_parallel_all_reduce_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                                              eps: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`(rmsnorm(sum(x) + residual) * weight, sum(x) + residual)` in one kernel when the TP group
    has the fused all-reduce (parallel/fused_allreduce_norm.py) and x fits it; None otherwise,
    and then the caller all-reduces x and normalises (the same values, two steps)."""
    state = get_parallel_state()
    custom = state.tp_custom_allreduce if state.tp.size > 1 else None
    fused = None if custom is None else custom.fused
    if fused is None or not fused.fits(x, residual):
        return None
    return fused(x, residual, weight, eps)


def tensor_model_parallel_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate every TP rank's `x` along `dim` (rank order); identity at TP size 1."""
    tp = get_parallel_state().tp
    if tp.size == 1:
        return x
    dim = dim % x.dim()
    x = x.contiguous()
    flat = torch.empty((tp.size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(flat, x.contiguous(), group=tp.group)  # rank r's x at rows [r * n, (r + 1) * n)
    gathered = flat.view(tp.size, *x.shape)  # [tp_size, *x.shape]
    return torch.cat(gathered.unbind(0), dim=dim)


# ---- pipeline parallel --------------------------------------------------------------------
# Sends are asynchronous so a stage can start its next micro-batch while the next stage still
# receives this one (several batches in flight, workers/engine.py). Each stage sends only to
# its successor and every rank runs the steps in the same order, so the receives match the
# sends one to one. The previous send is completed before the next one is posted: at most one
# send per stage is pending, its tensor kept alive here until then (the caller must not
# modify a tensor it sent). On NCCL `wait` only orders the streams; on gloo it blocks until
# the bytes have left, which needs the next stage to have posted the receive of the previous
# batch, which it does as soon as that batch's metadata arrives (no cycle: deadlock-free).

_pending_sends: list[tuple[Any, torch.Tensor]] = []  # (work, tensor) of the posted send


def send_to_next_stage(x: torch.Tensor) -> None:
    """Post the send of `x` to this TP rank's peer in the next pipeline stage; returns once the
    previous send has completed (this one completes in the background)."""
    pp = get_parallel_state().pp
    if pp.rank == pp.size - 1:
        raise RuntimeError("the last pipeline stage has no next stage")
    wait_pipeline_sends()
    x = x.contiguous()
    _pending_sends.append((dist.isend(x, dst=pp.ranks[pp.rank + 1]), x))


def wait_pipeline_sends() -> None:
    """Complete every posted stage-to-stage send (before reusing its buffer or leaving the group)."""
    while _pending_sends:
        work, _ = _pending_sends.pop(0)
        work.wait()


def recv_from_prev_stage(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Receive a tensor of `shape` from this TP rank's peer in the previous pipeline stage."""
    pp = get_parallel_state().pp
    if pp.rank == 0:
        raise RuntimeError("the first pipeline stage has no previous stage")
    out = torch.empty(shape, dtype=dtype, device=device)
    dist.recv(out, src=pp.ranks[pp.rank - 1])
    return out


# ---- expert parallel ----------------------------------------------------------------------


def expert_all_to_all(x: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
    """Rows `x[sum(send_counts[:r]) : ...]` go to EP rank r; returns the rows received, by source rank.

    x: [sum(send_counts), *row] -> [sum(recv_counts), *row]
    """
    ep = get_parallel_state().ep
    if ep.size == 1:
        return x.clone()
    out = torch.empty((sum(recv_counts), *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv_counts, input_split_sizes=send_counts,
                           group=ep.group)
    return out


def expert_exchange_counts(send_counts: torch.Tensor) -> torch.Tensor:
    """send_counts[r] rows go from this rank to EP rank r; returns recv_counts[r] from rank r."""
    ep = get_parallel_state().ep
    if ep.size == 1:
        return send_counts.clone()
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=ep.group)
    return recv_counts


def expert_all_gather(x: torch.Tensor, num_rows: list[int]) -> torch.Tensor:
    """Concatenate every EP rank's rows (rank r holds `num_rows[r]`) in rank order.

    x: [num_rows[ep_rank], *row] -> [sum(num_rows), *row]
    """
    ep = get_parallel_state().ep
    if ep.size == 1:
        return x
    max_rows = max(num_rows)
    padded = torch.zeros((max_rows, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    flat = torch.empty((ep.size * max_rows, *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(flat, padded.contiguous(), group=ep.group)
    gathered = flat.view(ep.size, max_rows, *x.shape[1:])  # [ep, max_rows, *row]
    return torch.cat([gathered[r, :n] for r, n in enumerate(num_rows)])


# ---- host-side metadata -------------------------------------------------------------------


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Pickle `obj` on global rank `src` and return it on every rank (gloo CPU group).

    Two broadcasts: the payload size, then the bytes. Identity in a single process.
    """
    state = get_parallel_state()
    if state.world_size == 1:
        return obj
    size = torch.zeros(1, dtype=torch.int64)
    payload = b""
    if state.rank == src:
        payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        size[0] = len(payload)
    dist.broadcast(size, src=src, group=state.cpu_group)
    if state.rank == src:
        buffer = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    else:
        buffer = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.broadcast(buffer, src=src, group=state.cpu_group)
    return obj if state.rank == src else pickle.loads(buffer.numpy().tobytes())


def cpu_all_reduce_min(value: int) -> int:
    """The minimum of `value` over all ranks (gloo CPU group); identity in a single process."""
    state = get_parallel_state()
    if state.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=state.cpu_group)
    return int(t.item())

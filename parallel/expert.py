"""Expert parallelism: which experts a rank holds and how routed tokens reach them.

Under EP the `ep_size` ranks of an EP group split the experts into contiguous ranges
(`ExpertPlacement`); every rank holds its range whole along the expert axis (its slice of each
expert's intermediate features when moe_tp = tp / ep > 1). The router runs replicated, so every
rank of the stage knows every token's top-k experts. `dispatch_and_combine` then takes one of
two paths and returns the complete MoE output [num_tokens, hidden] on every rank
(`dispatch_and_combine_unreduced` leaves the all-reduce path's sum to its caller):
  all-reduce (small batches, and whenever moe_tp > 1): each rank runs its local experts on the
    tokens routed to them, the others contribute zero, and one TP all-reduce sums the partial
    outputs (no token moves); with ep_size 1 this is exactly tensor-parallel MoE;
  all-to-all (ep == tp, at least `all_to_all_min_tokens` tokens): EP rank r takes token slice
    r, sends each (token, expert) row to the expert's owner, which runs its experts and sends the
    rows back; the sender weights and sums them into its slice, and one all-gather over the EP
    group reassembles the tokens.
The all-reduce path has static shapes and no host sync, so it is the one used under CUDA-graph
capture (decode); the all-to-all path reads the exchanged row counts on the host (eager only). A
caller's own partial sum (`partial`, e.g. a TP-sharded shared expert) rides in the same
all-reduce; on the all-to-all path it needs its own all-reduce.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from shardserve.parallel.comm import (
    expert_all_gather,
    expert_all_to_all,
    expert_exchange_counts,
    tensor_model_parallel_all_reduce,
)
from shardserve.parallel.state import ParallelState, get_parallel_state

# (x [n, hidden], topk_ids [n, k] global expert ids, topk_weights [n, k]) -> partial output [n, hidden];
# ids of experts this rank does not hold contribute nothing.
LocalExperts = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def split_evenly(total: int, parts: int) -> list[int]:
    """Sizes of `parts` contiguous ranges covering `total`, the first ones one larger."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


@dataclass(frozen=True)
class ExpertPlacement:
    """Experts [start, end) of `num_experts` live on this EP rank; `owner_start[r]` is rank r's first."""

    num_experts: int
    ep_size: int
    ep_rank: int

    def __post_init__(self) -> None:
        if self.num_experts < self.ep_size:
            raise ValueError(f"expert_parallel_size {self.ep_size} exceeds the model's {self.num_experts} experts")

    @property
    def counts(self) -> list[int]:
        return split_evenly(self.num_experts, self.ep_size)

    @property
    def owner_start(self) -> list[int]:
        counts = self.counts
        return [sum(counts[:r]) for r in range(self.ep_size)]

    @property
    def start(self) -> int:
        return self.owner_start[self.ep_rank]

    @property
    def num_local(self) -> int:
        return self.counts[self.ep_rank]

    def is_local(self, expert: int) -> bool:
        return self.start <= expert < self.start + self.num_local

    def owner_of(self, expert_ids: torch.Tensor) -> torch.Tensor:
        """EP rank holding each global expert id (same shape as expert_ids)."""
        bounds = torch.tensor(self.owner_start[1:], dtype=expert_ids.dtype, device=expert_ids.device)
        return torch.bucketize(expert_ids, bounds, right=True)


def use_all_to_all(state: ParallelState, num_tokens: int) -> bool:
    if state.ep_size == 1 or state.moe_tp_size != 1 or state.expert_dispatch == "all_reduce":
        return False
    return state.expert_dispatch == "all_to_all" or num_tokens >= state.all_to_all_min_tokens


def capturing_graph(x: torch.Tensor) -> bool:
    """True while x's device stream is recording a CUDA graph (no host syncs allowed)."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def dispatch_and_combine(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                         run_local_experts: LocalExperts, placement: ExpertPlacement,
                         partial: torch.Tensor | None = None) -> torch.Tensor:
    """The MoE output [T, hidden] for replicated x [T, hidden] and routing [T, top_k].

    partial: optional [T, hidden] per-rank partial sum (summed over the TP group) added to it.
    """
    out, is_partial = dispatch_and_combine_unreduced(x, topk_ids, topk_weights, run_local_experts, placement,
                                                     partial)
    return tensor_model_parallel_all_reduce(out) if is_partial else out


def dispatch_and_combine_unreduced(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                                   run_local_experts: LocalExperts, placement: ExpertPlacement,
                                   partial: torch.Tensor | None = None) -> tuple[torch.Tensor, bool]:
    """`dispatch_and_combine` without the final TP all-reduce: (output [T, hidden], True) when the
    output is still this rank's partial sum (the all-reduce path: the caller reduces it, e.g.
    fused into the next RMSNorm), (output, False) when it is complete (the all-to-all path). The
    flag is decided on the host from shapes and settings, identically on every rank."""
    state = get_parallel_state()
    if not capturing_graph(x) and use_all_to_all(state, x.shape[0]):
        out = _all_to_all(x, topk_ids, topk_weights, run_local_experts, placement, state)
        return (out if partial is None else out + tensor_model_parallel_all_reduce(partial)), False
    out = run_local_experts(x, topk_ids, topk_weights)  # [T, hidden], partial over experts and moe_tp
    if partial is not None:
        out = out + partial
    return out, True  # one all-reduce, by the caller, for routed and shared parts


def _all_to_all(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                run_local_experts: LocalExperts, placement: ExpertPlacement, state: ParallelState) -> torch.Tensor:
    num_tokens, top_k = topk_ids.shape
    rows_per_rank = split_evenly(num_tokens, state.ep_size)
    lo = sum(rows_per_rank[: state.ep_rank])
    hi = lo + rows_per_rank[state.ep_rank]
    my_ids = topk_ids[lo:hi].reshape(-1)  # [n * top_k] this slice's assignments, token-major
    my_weights = topk_weights[lo:hi].reshape(-1)  # [n * top_k]
    dest = placement.owner_of(my_ids)  # [n * top_k]
    order = torch.argsort(dest, stable=True)  # assignments grouped by destination rank
    token_of = order // top_k  # [n * top_k] row in this slice of each sorted assignment
    send_counts_t = torch.bincount(dest, minlength=state.ep_size)  # [ep]
    recv_counts_t = expert_exchange_counts(send_counts_t)  # [ep]
    send_counts, recv_counts = send_counts_t.tolist(), recv_counts_t.tolist()

    # Dispatch: token rows and their expert ids to the owners.
    recv_x = expert_all_to_all(x[lo:hi].index_select(0, token_of), send_counts, recv_counts)  # [m, hidden]
    recv_ids = expert_all_to_all(my_ids[order], send_counts, recv_counts)  # [m]
    ones = torch.ones((recv_ids.shape[0], 1), dtype=x.dtype, device=x.device)
    y = run_local_experts(recv_x, recv_ids[:, None], ones)  # [m, hidden] unweighted, one expert per row

    # Combine: rows back to their senders (same order as sent), weighted sum per token.
    back = expert_all_to_all(y, recv_counts, send_counts)  # [n * top_k, hidden]
    out = torch.zeros((hi - lo, x.shape[1]), dtype=x.dtype, device=x.device)  # [n, hidden]
    out.index_add_(0, token_of, back * my_weights[order, None].to(x.dtype))
    return expert_all_gather(out, rows_per_rank)  # [T, hidden]

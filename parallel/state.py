"""Which slice of the model this process holds: tensor, pipeline and expert parallel groups.

`init_parallel(rank, world_size, tp, pp, ep, master_addr, master_port, backend, kernels=...)` joins
the process group (NCCL on GPU, gloo on CPU), creates every sub-group, installs the resulting
`ParallelState` and this process's KernelOptions (parallel/options.py). It needs nothing but an
address, so a local launcher and Ray actors call it the same way. Layers read the state through
`get_parallel_state()` when they are constructed (to size and slice their weights) and the
collectives in `comm.py` when they run. Without setup the state is the single-process one.

Rank layout (world = PP x TP; EP lives inside a pipeline stage):
    rank = pp_rank * tp_size + tp_rank
    TP group of stage s:  ranks [s * tp, (s + 1) * tp)       (all-reduce / all-gather)
    PP group of column t: ranks t, t + tp, t + 2 * tp, ...   (send / recv between stages)
    EP: the TP ranks of a stage split the experts ep ways; each expert's intermediate features
        are split over moe_tp = tp / ep ranks. ep_rank = tp_rank // moe_tp, and the EP group
        of a rank is the ranks of its stage with the same tp_rank % moe_tp (token all-to-all).
    CPU group: all ranks over gloo, for host-side metadata (object broadcast, block counts).
On NCCL with TP > 1 and `kernels.custom_allreduce`, `init_parallel` also sets up the TP group's
symmetric-memory all-reduce (parallel/custom_allreduce.py, before the model is loaded) as
`ParallelState.tp_custom_allreduce`; None (NCCL for every TP all-reduce) when it is unavailable.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from shardserve.parallel.custom_allreduce import CustomAllReduce, create_custom_allreduce
from shardserve.parallel.options import DEFAULT_KERNEL_OPTIONS, KernelOptions, set_kernel_options

ExpertDispatch = Literal["auto", "all_to_all", "all_reduce"]
DEFAULT_TIMEOUT_S = 300.0
# The rendezvous waits at least this long whatever `timeout_s` is: ranks start seconds apart
# (process start, imports), which must not fail a group whose collectives should fail fast.
RENDEZVOUS_MIN_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class GroupInfo:
    """One parallel dimension as seen by this process.

    group: the torch.distributed ProcessGroup (None when size is 1).
    rank: this process's index inside the group, in [0, size).
    size: number of processes in the group.
    ranks: the global ranks of the group in group-rank order (empty in fake/single states).
    """

    rank: int = 0
    size: int = 1
    group: Any = None
    ranks: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"group size must be >= 1, got {self.size}")
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank must be in [0, {self.size}), got {self.rank}")
        if self.size > 1 and self.group is None:
            raise ValueError(f"a group of size {self.size} needs a process group handle")
        if self.ranks and len(self.ranks) != self.size:
            raise ValueError(f"group of size {self.size} lists {len(self.ranks)} ranks")


@dataclass(frozen=True)
class ParallelState:
    """Tensor (tp), pipeline (pp) and expert (ep) parallel groups of this process.

    rank / world_size: global rank and number of processes.
    cpu_group: a gloo group over all ranks (None in a single process).
    pp_layer_partition: decoder layers per pipeline stage (None: split evenly).
    expert_dispatch: how MoE layers under EP move tokens: `all_to_all` (dispatch/combine),
      `all_reduce` (every rank runs its experts on all tokens; partial sums meet in one
      all-reduce, i.e. reduce-scatter + all-gather), or `auto` (all-reduce below
      `all_to_all_min_tokens` tokens in a step, all-to-all from there up).
    tp_custom_allreduce: the TP group's symmetric-memory all-reduce for small messages (None:
      NCCL only); `tensor_model_parallel_all_reduce` asks it first.
    """

    tp: GroupInfo = field(default_factory=GroupInfo)
    pp: GroupInfo = field(default_factory=GroupInfo)
    ep: GroupInfo = field(default_factory=GroupInfo)
    rank: int = 0
    world_size: int = 1
    cpu_group: Any = None
    pp_layer_partition: tuple[int, ...] | None = None
    expert_dispatch: ExpertDispatch = "auto"
    all_to_all_min_tokens: int = 32
    tp_custom_allreduce: CustomAllReduce | None = None

    @property
    def tp_rank(self) -> int:
        return self.tp.rank

    @property
    def tp_size(self) -> int:
        return self.tp.size

    @property
    def pp_rank(self) -> int:
        return self.pp.rank

    @property
    def pp_size(self) -> int:
        return self.pp.size

    @property
    def ep_rank(self) -> int:
        return self.ep.rank

    @property
    def ep_size(self) -> int:
        return self.ep.size

    @property
    def moe_tp_size(self) -> int:
        """How many ranks split each expert's intermediate features (tp_size / ep_size)."""
        return self.tp.size // self.ep.size

    @property
    def moe_tp_rank(self) -> int:
        return self.tp.rank % self.moe_tp_size

    @property
    def is_first_pp_rank(self) -> bool:
        return self.pp.rank == 0

    @property
    def is_last_pp_rank(self) -> bool:
        return self.pp.rank == self.pp.size - 1


def single_process_state() -> ParallelState:
    """The state of a process that holds the whole model: all sizes 1."""
    return ParallelState()


_current: ParallelState = single_process_state()


def get_parallel_state() -> ParallelState:
    """The state installed by `set_parallel_state`, or the single-process one."""
    return _current


def set_parallel_state(state: ParallelState) -> None:
    """Install this process's state; call before building the model."""
    global _current
    _current = state


def validate_sizes(world_size: int, tp: int, pp: int, ep: int) -> None:
    """Raise ValueError naming the bad size unless world = tp * pp and ep divides tp."""
    for name, value in (("tensor_parallel_size", tp), ("pipeline_parallel_size", pp),
                        ("expert_parallel_size", ep)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if world_size != tp * pp:
        raise ValueError(f"world_size {world_size} must equal tensor_parallel_size x pipeline_parallel_size "
                         f"= {tp} x {pp}")
    if tp % ep:
        raise ValueError(f"expert_parallel_size {ep} must divide tensor_parallel_size {tp} "
                         "(experts are split among the ranks of one pipeline stage)")


def group_layout(world_size: int, tp: int, pp: int, ep: int) -> dict[str, list[tuple[int, ...]]]:
    """Global ranks of every TP, PP and EP group (see the module docstring)."""
    validate_sizes(world_size, tp, pp, ep)
    moe_tp = tp // ep
    return {
        "tp": [tuple(range(s * tp, (s + 1) * tp)) for s in range(pp)],
        "pp": [tuple(t + s * tp for s in range(pp)) for t in range(tp)],
        "ep": [tuple(s * tp + e * moe_tp + m for e in range(ep)) for s in range(pp) for m in range(moe_tp)],
    }


def _join(kind: str, groups: list[tuple[int, ...]], rank: int, timeout: datetime.timedelta) -> GroupInfo:
    """Create every group of one kind (all ranks must call new_group in the same order)."""
    mine = GroupInfo()
    for ranks in groups:
        handle = dist.new_group(list(ranks), timeout=timeout) if len(ranks) > 1 else None
        if rank in ranks:
            mine = GroupInfo(rank=ranks.index(rank), size=len(ranks), group=handle, ranks=ranks)
    if not mine.ranks:
        raise RuntimeError(f"rank {rank} is in no {kind} group")
    return mine


def init_parallel(rank: int, world_size: int, tp: int, pp: int, ep: int | None = None,
                  master_addr: str = "127.0.0.1", master_port: int = 29500, backend: str | None = None,
                  timeout_s: float = DEFAULT_TIMEOUT_S, pp_layer_partition: tuple[int, ...] | None = None,
                  expert_dispatch: ExpertDispatch = "auto", all_to_all_min_tokens: int = 32,
                  kernels: KernelOptions = DEFAULT_KERNEL_OPTIONS) -> ParallelState:
    """Join the process group at `master_addr:master_port` and install this rank's state.

    ep: ranks the experts are split over inside a stage; None = every rank of the stage (tp).
    backend: `nccl` or `gloo`; None picks nccl when CUDA is available, else gloo. On NCCL the
      caller selects the CUDA device first (torch.cuda.set_device).
    timeout_s: every collective of every group (all-reduce, all-to-all, pipeline send/recv) fails
      after this long instead of hanging when a peer has died or stalled. The rendezvous (the TCP
      store every rank joins, and group creation through it) waits max(timeout_s,
      RENDEZVOUS_MIN_TIMEOUT_S), so a small timeout does not fail ranks that start late.
    kernels: this process's kernel switches (installed with set_kernel_options; every rank must
      pass the same); with `custom_allreduce` on NCCL with tp > 1, set up the TP group's custom all-reduce.
    """
    set_kernel_options(kernels)
    ep = tp if ep is None else ep
    layout = group_layout(world_size, tp, pp, ep)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if pp_layer_partition is not None and len(pp_layer_partition) != pp:
        raise ValueError(f"pp_layer_partition {pp_layer_partition} must list one layer count per stage ({pp})")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(master_addr, master_port, world_size, is_master=rank == 0, multi_tenant=True,
                          timeout=datetime.timedelta(seconds=max(timeout_s, RENDEZVOUS_MIN_TIMEOUT_S)))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    tp_info = _join("tp", layout["tp"], rank, timeout)
    pp_info = _join("pp", layout["pp"], rank, timeout)
    ep_info = _join("ep", layout["ep"], rank, timeout)
    cpu_group = dist.new_group(list(range(world_size)), backend="gloo", timeout=timeout)
    custom = None
    if kernels.custom_allreduce and backend == "nccl" and tp > 1:  # the same on every rank: all join the setup
        custom = create_custom_allreduce(tp_info.group, tp_info.ranks, cpu_group,
                                         torch.device("cuda", torch.cuda.current_device()), options=kernels)
    state = ParallelState(tp=tp_info, pp=pp_info, ep=ep_info, rank=rank, world_size=world_size,
                          cpu_group=cpu_group, pp_layer_partition=pp_layer_partition,
                          expert_dispatch=expert_dispatch, all_to_all_min_tokens=all_to_all_min_tokens,
                          tp_custom_allreduce=custom)
    set_parallel_state(state)
    return state


def destroy_parallel() -> None:
    """Leave the process group (if any) and go back to the single-process state."""
    custom = get_parallel_state().tp_custom_allreduce
    if custom is not None:
        custom.close()  # unmap the peers' buffers while the group still exists
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    set_parallel_state(single_process_state())
    set_kernel_options(DEFAULT_KERNEL_OPTIONS)

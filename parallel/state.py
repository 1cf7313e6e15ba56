"""Which slice of the model this process holds: tensor, pipeline and expert parallel groups.

A `ParallelState` is built once per process (by the worker group, after torch.distributed is
initialised) and installed with `set_parallel_state`; layers read it through
`get_parallel_state()` when they are constructed (to size and slice their weights) and the
collectives in `comm.py` read it when they run. Without any setup the current state is the
single-process one: every size is 1, every rank 0, no process group, and no torch.distributed
initialisation is needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class GroupInfo:
    """One parallel dimension as seen by this process.

    group: the torch.distributed ProcessGroup (None when size is 1).
    rank: this process's index inside the group, in [0, size).
    size: number of processes in the group.
    """

    rank: int = 0
    size: int = 1
    group: Any = None

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"group size must be >= 1, got {self.size}")
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank must be in [0, {self.size}), got {self.rank}")
        if self.size > 1 and self.group is None:
            raise ValueError(f"a group of size {self.size} needs a process group handle")


@dataclass(frozen=True)
class ParallelState:
    """Tensor (tp), pipeline (pp) and expert (ep) parallel groups of this process."""

    tp: GroupInfo = field(default_factory=GroupInfo)
    pp: GroupInfo = field(default_factory=GroupInfo)
    ep: GroupInfo = field(default_factory=GroupInfo)

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

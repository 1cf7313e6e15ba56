"""RankProbe: how a measurement rides along a window of steps on every rank, without the worker knowing it.

A benchmark or profiler builds a probe (a small picklable object whose class it owns) and hands
it to every rank with `executor.call("probe_start", probe)`; the rank calls `probe.start(info)`
between two steps, runs its steps as usual, and on `executor.call("probe_stop")` answers with
`probe.stop()` — a picklable report (per-rank step timing, a kernel profile ...). The worker
imports only this Protocol, so measurement code (workers/bench/rank_timing.py, the lab's
benchmarks/kernel_profile.py) stays out of the product's import graph. There are no per-step
hooks on purpose: the runner already records each step's host and device times in its
`StepTimes` (runner/step_records.py, kept only while `enabled`), which `RankInfo` hands over, and
a hook on the step path would cost every step of every run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from shardserve.workers.runner.step_records import StepTimes


@dataclass(frozen=True)
class RankInfo:
    """What a probe may look at on its rank: where it runs, and the runner's per-step records."""

    rank: int  # global rank
    tp_rank: int
    pp_rank: int
    ep_rank: int
    device: torch.device
    step_times: StepTimes  # the runner's own; a probe may enable and read it


class RankProbe(Protocol):
    def start(self, info: RankInfo) -> None:
        """Begin measuring on this rank (called between steps)."""
        ...

    def stop(self) -> Any:
        """Stop, once every step launched in the window has been run; the picklable report."""
        ...

"""Per-rank step timing: is each rank's host keeping its device fed?

Why: at TP 4 a batch-1 decode step is a couple of milliseconds of GPU work, and every rank's host
must prepare the inputs, replay the graph and run the eager sampler within that time, or its
device idles and, through the next collective, so do the others. A kernel profile cannot show
this without slowing the host it measures (under CUPTI a graph launch takes an order of magnitude
longer), so this reads the runner's own records (ModelRunner.step_times: CUDA events and wall
clocks, cheap) on every rank: `time_ranks` passes a `RankTimingProbe` (a RankProbe,
worker/probe.py) to every rank with the Worker calls `probe_start` / `probe_stop`.

Per rank, medians over the steps: `launch_ms` (the host's launch() of a step), `replay_ms`
(the decode graph's replay call; NaN without graphs), `host_ms` (launch + finish minus the wait),
`wait_ms` (blocked on the sampled ids: slack), `gpu_ms` (first upload to sampled ids on the
device) and `gap_ms` (device idle between a step's sampled ids and the next step's first upload,
when the host is late), and the means of those two. Under async scheduling the host's critical
path is the driver's turnaround (`driver_ms`) then `prep_ms` (launch up to the graph replay); it
must fit in one step of device time, so their medians and 90th percentiles are printed too. A fed
device has gap ~0 and wait > 0. Device times need CUDA events: NaN on CPU.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from shardserve.workers.runner.step_records import StepTimes
from shardserve.workers.worker.probe import RankInfo

T = TypeVar("T")


@dataclass(frozen=True)
class RankTiming:
    rank: int
    steps: int
    launch_ms: float
    replay_ms: float
    host_ms: float
    wait_ms: float
    gpu_ms: float
    gap_ms: float
    graph_steps: int = 0  # steps that replayed a decode graph
    eager_steps: int = 0
    # means beside the medians: a few long steps (a late host, a stall) move the tokens/s a
    # benchmark reports but not the medians
    gpu_mean_ms: float = float("nan")
    gap_mean_ms: float = float("nan")
    # the host's critical path under async scheduling (median, 90th percentile): the driver's
    # turnaround as this rank sees it (StepTimes.driver_s), then launch() up to the graph replay
    driver_ms: float = float("nan")
    driver_p90_ms: float = float("nan")
    prep_ms: float = float("nan")
    prep_p90_ms: float = float("nan")
    launch_p90_ms: float = float("nan")

    @classmethod
    def from_times(cls, rank: int, times: StepTimes) -> RankTiming:
        def median_ms(values: list[float]) -> float:
            return statistics.median(values) * 1e3 if values else float("nan")

        def mean_ms(values: list[float]) -> float:
            return statistics.fmean(values) * 1e3 if values else float("nan")

        def p90_ms(values: list[float]) -> float:
            return sorted(values)[(9 * len(values)) // 10] * 1e3 if values else float("nan")

        return cls(rank, len(times.host_s), median_ms(times.launch_s), median_ms(times.replay_s),
                   median_ms(times.host_s),
                   median_ms(times.wait_s), median_ms(times.gpu_s), median_ms(times.gap_s), times.graph_steps,
                   times.eager_steps, mean_ms(times.gpu_s), mean_ms(times.gap_s),
                   median_ms(times.driver_s), p90_ms(times.driver_s), median_ms(times.prep_s), p90_ms(times.prep_s),
                   p90_ms(times.launch_s))

    def line(self) -> str:
        return (f"rank {self.rank}: {self.steps} steps, launch {self.launch_ms:.3f} ms (p90 {self.launch_p90_ms:.3f}; "
                f"graph replay {self.replay_ms:.3f}), host {self.host_ms:.3f} ms, "
                f"wait {self.wait_ms:.3f} ms, GPU {self.gpu_ms:.3f} ms (mean {self.gpu_mean_ms:.3f}), "
                f"device gap {self.gap_ms:.3f} ms (mean {self.gap_mean_ms:.3f}); critical path: driver turnaround "
                f"{self.driver_ms:.3f} ms (p90 {self.driver_p90_ms:.3f}), prep to replay {self.prep_ms:.3f} ms "
                f"(p90 {self.prep_p90_ms:.3f})")


def start_timing(times: StepTimes) -> None:
    times.clear()
    times.enabled = True


def stop_timing(rank: int, times: StepTimes) -> RankTiming:
    times.enabled = False
    return RankTiming.from_times(rank, times)


class RankTimingProbe:
    """The RankProbe that records a rank's StepTimes over the window and reports its RankTiming."""

    def __init__(self) -> None:
        self._info: RankInfo | None = None

    def start(self, info: RankInfo) -> None:
        self._info = info
        start_timing(info.step_times)

    def stop(self) -> RankTiming:
        assert self._info is not None, "stop before start"
        return stop_timing(self._info.rank, self._info.step_times)


def time_ranks(call: Callable[..., list], run_steps: Callable[[], T]) -> tuple[T, list[RankTiming]]:
    """`run_steps()`'s result and every rank's RankTiming over the steps it makes (`call`: the executor's)."""
    call("probe_start", RankTimingProbe())
    try:
        result = run_steps()
    finally:
        timings = call("probe_stop")
    return result, timings

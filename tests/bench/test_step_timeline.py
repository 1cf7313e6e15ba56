"""StepTimeline (benchmarks/step_timeline.py): per-step shapes and completion intervals, in order."""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from shardserve.workers.step_types import ScheduledRequest, SchedulerOutput  # noqa: E402
from step_timeline import StepTimeline  # noqa: E402


class _Executor:
    num_blocks = 7

    def __init__(self) -> None:
        self.collected = []

    def submit(self, sched):
        return sched

    def collect(self, handle):
        time.sleep(0.02 if handle.num_batched_tokens > 10 else 0.001)  # the prefill step is slow
        self.collected.append(handle)
        return len(handle.scheduled)


def _step(rows: int, prefill: int = 0) -> SchedulerOutput:
    scheduled = [ScheduledRequest(f"d{i}", (1,), 5, (), True) for i in range(rows)]
    if prefill:
        scheduled.append(ScheduledRequest("p", (2,) * prefill, 0, (0,), False))
    return SchedulerOutput((), tuple(scheduled), rows + prefill)


def test_records_each_steps_shape_and_interval_in_submit_order():
    inner = _Executor()
    timeline = StepTimeline(inner)
    assert timeline.num_blocks == 7  # everything else is forwarded
    first, second = timeline.submit(_step(3, prefill=40)), timeline.submit(_step(4))  # two in flight
    assert timeline.collect(first) == 4 and timeline.collect(second) == 4
    assert timeline.execute(_step(2)) == 2
    shapes = [(r.tokens, r.rows, r.sampled) for r in timeline.records]
    assert shapes == [(43, 4, 3), (4, 4, 4), (2, 2, 2)]
    assert timeline.records[0].interval_s >= 0.02 > timeline.records[1].interval_s
    text = timeline.summary(spans=3, slowest=1)
    assert text.startswith("timeline: 3 steps in ")
    assert "decode-only 2 steps" in text and "with prefill 1 steps" in text
    assert "slowest: #0 " in text and "(43 tok, 4 rows)" in text
    assert len([ln for ln in text.splitlines() if ln.strip()[:1].isdigit()]) == 3  # one line per span

"""Where a whole offline run's time goes, step by step, seen from the driver.

Why: a profiled window (pp_window_trace.py) shows one phase of a run; the PP 2 run as a whole
reached ~80 % of what its decode and prefill windows predict, so the loss sits in steps no
window covered. `StepTimeline` wraps the engine's executor: at submit it records the step's
shape (tokens, rows, sampled rows), at collect the time. Steps finish in submit order, so the
time between two collects is what a step cost the run's throughput, pipelined or not.

`summary()` gives: time in decode-only steps vs steps with prefill tokens; the run cut into ten
equal spans of steps (time, prefill tokens, sampled rows, rows per step, tokens/s in each); and
the slowest steps with their shapes and positions (a one-time cost shows as an early outlier, a
pipeline bubble as a slow step after a change of shape).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class StepRecord:
    tokens: int  # tokens fed this step (decode rows count 1 each)
    rows: int  # requests in the step
    sampled: int  # rows that sample a token (decode rows + last prefill chunks)
    interval_s: float  # time since the previous step was collected (the first: since the first submit)


@dataclass
class StepTimeline:
    """Executor wrapper: forwards every call, records each step's shape and completion time."""

    inner: object
    records: list[StepRecord] = field(default_factory=list, init=False)
    _shapes: list[tuple[int, int, int]] = field(default_factory=list, init=False)  # submitted, in order
    _last: float | None = field(default=None, init=False)  # the previous collect (or the first submit)

    def __getattr__(self, name: str):  # num_blocks, check_health, shutdown, ...
        return getattr(self.inner, name)

    def submit(self, sched):
        if self._last is None:
            self._last = time.perf_counter()
        self._shapes.append((sched.num_batched_tokens, len(sched.scheduled),
                             sum(1 for r in sched.scheduled if r.sample)))
        return self.inner.submit(sched)

    def collect(self, handle):
        output = self.inner.collect(handle)
        now = time.perf_counter()
        tokens, rows, sampled = self._shapes[len(self.records)]
        self.records.append(StepRecord(tokens, rows, sampled, now - self._last))
        self._last = now
        return output

    def execute(self, sched):
        return self.collect(self.submit(sched))

    def summary(self, spans: int = 10, slowest: int = 8) -> str:
        recs = [r for r in self.records if r.rows]  # empty steps carry no work
        if not recs:
            return "timeline: no steps"
        total = sum(r.interval_s for r in recs)
        decode = [r for r in recs if r.tokens == r.rows]
        prefill = [r for r in recs if r.tokens > r.rows]
        lines = [f"timeline: {len(recs)} steps in {total:.2f} s; decode-only {len(decode)} steps "
                 f"{sum(r.interval_s for r in decode):.2f} s (mean {_mean_ms(decode):.2f} ms); with prefill "
                 f"{len(prefill)} steps {sum(r.interval_s for r in prefill):.2f} s (mean {_mean_ms(prefill):.2f} ms)"]
        lines.append("  span   steps   time s  prefill tok  sampled  rows/step  tok/s")
        size = -(-len(recs) // spans)
        for k in range(0, len(recs), size):
            part = recs[k:k + size]
            secs = sum(r.interval_s for r in part)
            pre = sum(r.tokens - r.rows for r in part if r.tokens > r.rows)
            sampled = sum(r.sampled for r in part)
            lines.append(f"  {k // size:>4} {len(part):>7} {secs:>8.2f} {pre:>12,} {sampled:>8,} "
                         f"{sum(r.rows for r in part) / len(part):>10.0f} {sampled / secs if secs else 0:>6,.0f}")
        worst = sorted(range(len(recs)), key=lambda i: recs[i].interval_s, reverse=True)[:slowest]
        lines.append("  slowest: " + "; ".join(
            f"#{i} {recs[i].interval_s * 1e3:.1f} ms ({recs[i].tokens} tok, {recs[i].rows} rows)" for i in worst))
        return "\n".join(lines)


def _mean_ms(recs: list[StepRecord]) -> float:
    return sum(r.interval_s for r in recs) / len(recs) * 1e3 if recs else 0.0

"""Engine counters: token throughput (totals and windowed rates) and the pipeline batch queue.

The engine records each step's prompt and generation token counts; `rates()` divides what
the last `window_s` seconds saw by the time they span. Under pipeline parallelism it also
records, at each submit, how many batches are in flight (`BatchQueueStats`); so does async
scheduling, where 2 shows that a step was launched while the previous one was still running.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass


class ThroughputMeter:
    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self.total_prompt_tokens = 0
        self.total_generation_tokens = 0
        self._events: deque[tuple[float, int, int]] = deque()  # (time, prompt, generation)

    def record(self, num_prompt_tokens: int, num_generation_tokens: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.total_prompt_tokens += num_prompt_tokens
        self.total_generation_tokens += num_generation_tokens
        self._events.append((now, num_prompt_tokens, num_generation_tokens))
        while self._events and self._events[0][0] < now - self.window_s:
            self._events.popleft()

    def rates(self, now: float | None = None) -> tuple[float, float]:
        """(prompt tokens/s, generation tokens/s) over the window; 0 with fewer than 2 steps."""
        now = time.monotonic() if now is None else now
        events = [e for e in self._events if e[0] >= now - self.window_s]
        if len(events) < 2:
            return 0.0, 0.0
        span = max(now - events[0][0], 1e-9)
        return sum(e[1] for e in events) / span, sum(e[2] for e in events) / span


@dataclass
class BatchQueueStats:
    """Batches submitted (workers/inflight.py) and the most that were in flight at once (1 when
    synchronous)."""

    num_submitted: int = 0
    max_in_flight: int = 0

    def record_submit(self, num_in_flight: int) -> None:
        self.num_submitted += 1
        self.max_in_flight = max(self.max_in_flight, num_in_flight)

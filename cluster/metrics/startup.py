"""StartupClock: how long each start-up stage of an LLMServer replica took, for the log.

Stages: `process` is from the replica's process start (Linux /proc: Ray starting the actor's
worker, imports, Serve's replica set-up) to the LLMServer constructor; when Ray handed the actor a
worker it had started earlier (idle for more than PRESTARTED_S when this module was imported, at the
actor's class load), from that import instead: the idle time is not part of any start-up. Then
each `stage(name)` call closes the stage that ran since the previous mark (`engine`: weight load, KV cache sizing
and warm-up inside the engine's constructor). `log_ready` logs them all on one line: the first
place to look when a cold start (cluster/metrics/replica.py) is slow.
"""

from __future__ import annotations

import logging
import os
import time

# Serve writes this logger to the replica's log file (the root logger stays at WARNING there).
logger = logging.getLogger("ray.serve")
PRESTARTED_S = 10.0  # a worker older than this at our import was started before the actor was placed


def process_age_s() -> float | None:
    """Seconds since this process started (Linux), None where unknown."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime_s = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return uptime_s - start_ticks / os.sysconf("SC_CLK_TCK")


_AGE_AT_IMPORT = process_age_s()
_IMPORTED = time.monotonic()


class StartupClock:
    def __init__(self) -> None:
        self.stages: dict[str, float] = {}
        now = time.monotonic()
        if _AGE_AT_IMPORT is not None:
            fresh = _AGE_AT_IMPORT <= PRESTARTED_S
            self.stages["process"] = now - _IMPORTED + (_AGE_AT_IMPORT if fresh else 0.0)
        self._mark = now

    def stage(self, name: str) -> float:
        now = time.monotonic()
        self.stages[name] = now - self._mark
        self._mark = now
        return self.stages[name]

    def log_ready(self, model: str, replica_id: str) -> None:
        stages = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in self.stages.items())
        logger.info("replica %s of %s ready: %s (total %.2f s)", replica_id, model, stages, sum(self.stages.values()))

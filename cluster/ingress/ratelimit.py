"""Per-key request rate limits: one token bucket per API key, in this Ingress process.

Data flow: `Gate.admit` (cluster/ingress/auth.py) finds the caller's key, then calls
`RateLimiter.take(name)`. A key with `requests_per_minute = r` owns a bucket of capacity r that
refills at r / 60 per second; each request takes one token. An empty bucket raises `RateLimited`
(an ApiError: HTTP 429 with `Retry-After`, gRPC RESOURCE_EXHAUSTED with `retry-after` metadata),
saying how many seconds until a token is back. The buckets live in each Ingress replica, so with
`ingress.num_replicas = n` a key may get up to n × r requests a minute in all. Hand-written: a
token bucket is ten lines, and the PyPI limiters either add a store (Redis) or a sync-only API.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from shardserve.cluster.ingress.errors import ApiError
from shardserve.cluster.messages import ErrorKind


class RateLimited(ApiError):
    def __init__(self, name: str, per_minute: float, retry_after_s: float) -> None:
        super().__init__(
            ErrorKind.RATE_LIMITED,
            f"rate limit of API key {name!r} reached ({per_minute:g} requests per minute); "
            f"retry after {retry_after_s:.1f}s",
        )
        self.retry_after_s = retry_after_s

    @property
    def retry_after_header(self) -> str:
        """Whole seconds, rounded up (HTTP's Retry-After takes an integer)."""
        return str(max(1, math.ceil(self.retry_after_s)))


@dataclass
class TokenBucket:
    per_minute: float
    tokens: float
    updated: float

    def take(self, now: float) -> float:
        """Take one token; 0.0 when granted, else the seconds until one is back."""
        rate = self.per_minute / 60.0
        self.tokens = min(self.per_minute, self.tokens + (now - self.updated) * rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / rate


class RateLimiter:
    def __init__(self, limits: dict[str, float], clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        now = clock()
        self._buckets = {name: TokenBucket(rpm, rpm, now) for name, rpm in limits.items()}
        self._lock = threading.Lock()  # HTTP and gRPC may run on different threads of this process

    def take(self, name: str) -> None:
        bucket = self._buckets.get(name)
        if bucket is None:
            return
        with self._lock:
            wait_s = bucket.take(self._clock())
        if wait_s > 0:
            raise RateLimited(name, bucket.per_minute, wait_s)

"""Per-key rate limits: token buckets per API key, in this Ingress process (requests and tokens).

Data flow: `Gate.admit` (cluster/ingress/auth.py) finds the caller's key, then calls
`RateLimiter.take(name)`. A key with `requests_per_minute = r` owns a bucket of capacity r that
refills at r / 60 per second; each request takes one. `tokens_per_minute` is a second limiter of
the same kind whose requests take `cost` units (prompt + max_tokens, cluster/ingress/tokens.py);
`charge` takes units without a check (the bucket may go below zero: a debt later requests wait out).
A bucket short of what a request takes raises `RateLimited` (an ApiError: HTTP 429 with
`Retry-After`, gRPC RESOURCE_EXHAUSTED with `retry-after` metadata), saying how many seconds until
it holds enough. The buckets live in each Ingress replica, so with `ingress.num_replicas = n` a key
may get up to n × r a minute in all. Hand-written: a token bucket is ten lines, and the PyPI
limiters either add a store (Redis) or a sync-only API.
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
    def __init__(self, name: str, per_minute: float, retry_after_s: float, unit: str = "requests") -> None:
        super().__init__(
            ErrorKind.RATE_LIMITED,
            f"rate limit of API key {name!r} reached ({per_minute:g} {unit} per minute); "
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

    def _refill(self, now: float) -> float:
        rate = self.per_minute / 60.0
        self.tokens = min(self.per_minute, self.tokens + (now - self.updated) * rate)
        self.updated = now
        return rate

    def take(self, now: float, cost: float = 1.0) -> float:
        """Take `cost` tokens; 0.0 when granted, else the seconds until the bucket holds them."""
        rate = self._refill(now)
        if self.tokens >= cost:
            self.tokens -= cost
            return 0.0
        return (cost - self.tokens) / rate

    def charge(self, now: float, cost: float) -> None:
        """Take `cost` tokens unconditionally (the balance may go below zero)."""
        self._refill(now)
        self.tokens -= cost


class RateLimiter:
    def __init__(
        self, limits: dict[str, float], clock: Callable[[], float] = time.monotonic, unit: str = "requests"
    ) -> None:
        self._clock = clock
        self.unit = unit
        now = clock()
        self._buckets = {name: TokenBucket(rpm, rpm, now) for name, rpm in limits.items()}
        self._lock = threading.Lock()  # HTTP and gRPC may run on different threads of this process

    def limit(self, name: str) -> float | None:
        bucket = self._buckets.get(name)
        return None if bucket is None else bucket.per_minute

    def take(self, name: str, cost: float = 1.0) -> None:
        bucket = self._buckets.get(name)
        if bucket is None:
            return
        with self._lock:
            wait_s = bucket.take(self._clock(), cost)
        if wait_s > 0:
            raise RateLimited(name, bucket.per_minute, wait_s, self.unit)

    def charge(self, name: str, cost: float) -> None:
        bucket = self._buckets.get(name)
        if bucket is not None and cost > 0:
            with self._lock:
                bucket.charge(self._clock(), cost)

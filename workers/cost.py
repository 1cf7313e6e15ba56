"""CostMeter: what each request cost, from the engine's measured busy time and a price per device-hour.

The engine calls `record(rows, outputs)` once per applied batch (sync, async and pipeline modes alike):
    interval  = now - max(previous apply, earliest first-scheduled time of the batch's requests)
    batch_usd = interval x rate,  rate = ranks x (gpus_per_rank x gpu_hour_usd + cpus_per_rank x cpu_hour_usd) / 3600
    share_i   = batch_usd x (w_p P_i + w_d D_i) / sum_j (w_p P_j + w_d D_j)
P_i / D_i: the tokens request i fed at prompt positions / at generated positions (verified draft tokens of
speculative decoding included). Intervals tile the busy wall
time (first schedule after idle .. last apply; batches overlapping under async scheduling or pipeline stages
are counted once), so the shares of a run add up to busy_s x rate; a batch whose requests all left before it
came back (aborted, finished in flight) is `unattributed_usd`. Each share goes to `RequestMetrics.cost_usd` of
the request its caller sees (n samples add up there).
Weights: least squares (numpy) of interval = a + w_p P + w_d D over the last 256 batches, refitted every 16;
until it has 32 batches, a full-rank fit and both slopes > 0, w_p = w_d = 1 (every token alike). The fixed
part `a` is shared in proportion to the same weights. No price: `record` returns at once.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from shardserve.workers.config import CostConfig
from shardserve.workers.request import Request, RequestMetrics
from shardserve.workers.step_types import ScheduledRequest


class Billing(Protocol):
    """Where a scheduled sample's cost goes (OutputProcessor.billing): its Request and the metrics its
    caller reads, or None when the request has already left."""

    def billing(self, sample_id: str) -> tuple[Request, RequestMetrics] | None: ...


@dataclass(frozen=True)
class CostStats:
    usd_per_hour: float  # the worker group's price
    busy_s: float  # engine busy wall time priced so far
    cost_usd_total: float  # busy_s x usd_per_hour / 3600 = attributed + unattributed
    unattributed_usd: float  # batches whose requests had all left when they returned
    num_tokens: int  # prompt and generated tokens fed in batches with a live request
    num_output_tokens: int  # tokens sampled in them
    cost_per_million_tokens_usd: float | None
    cost_per_million_output_tokens_usd: float | None
    prefill_token_weight: float  # w_p / w_d in use (1.0 = the fallback)


def usd_per_hour(cost: CostConfig, world_size: int, device_type: str) -> float | None:
    """The worker group's price per hour; None when unpriced. ValueError for a price with nothing to price."""
    if not cost.priced:
        return None
    gpus = cost.gpus_per_rank if cost.gpus_per_rank is not None else (1.0 if device_type == "cuda" else 0.0)
    cpus = cost.cpus_per_rank if cost.cpus_per_rank is not None else float(torch.get_num_threads())
    if cost.cpu_hour_usd is None and gpus == 0:
        raise ValueError(f"cost.gpu_hour_usd is set but this engine has no GPUs (device {device_type}, "
                         "gpus_per_rank 0): set cost.cpu_hour_usd to price a CPU engine")
    return world_size * (gpus * (cost.gpu_hour_usd or 0.0) + cpus * (cost.cpu_hour_usd or 0.0))


class StepTimeFit:
    """Online least squares of a batch's interval on its prefill and decode token counts."""

    def __init__(self, window: int = 256, refit_every: int = 16, min_batches: int = 32) -> None:
        self.refit_every, self.min_batches = refit_every, min_batches
        self._samples: deque[tuple[float, float, float]] = deque(maxlen=window)  # (prefill, decode, interval)
        self._since_fit = 0
        self.weights = (1.0, 1.0)  # (w_p, w_d)

    def add(self, num_prefill: int, num_decode: int, interval: float) -> None:
        self._samples.append((num_prefill, num_decode, interval))
        self._since_fit += 1
        if self._since_fit >= self.refit_every and len(self._samples) >= self.min_batches:
            self._since_fit = 0
            self.weights = self._fit()

    def _fit(self) -> tuple[float, float]:
        data = np.asarray(self._samples, dtype=np.float64)  # [batches, 3]
        design = np.column_stack([np.ones(len(data)), data[:, 0], data[:, 1]])  # [batches, 3]: 1, P, D
        coef, _, rank, _ = np.linalg.lstsq(design, data[:, 2], rcond=None)
        w_p, w_d = float(coef[1]), float(coef[2])
        return (w_p, w_d) if rank == 3 and w_p > 0 and w_d > 0 else (1.0, 1.0)


class CostMeter:
    def __init__(self, usd_per_hour: float | None, clock: Callable[[], float] = time.monotonic,
                 fit: StepTimeFit | None = None) -> None:
        self.usd_per_hour = usd_per_hour
        self._usd_per_s = None if usd_per_hour is None else usd_per_hour / 3600.0
        self._clock = clock
        self.fit = fit or StepTimeFit()
        self._last_apply: float | None = None
        self.busy_s = 0.0
        self.unattributed_usd = 0.0
        self.num_tokens = 0
        self.num_output_tokens = 0

    @classmethod
    def for_engine(cls, cost: CostConfig, world_size: int, device_type: str) -> CostMeter:
        return cls(usd_per_hour(cost, world_size, device_type))

    def record(self, rows: Sequence[ScheduledRequest], billing: Billing) -> None:
        """Price one applied batch (its scheduled rows) and charge its requests."""
        if self._usd_per_s is None or not rows:  # unpriced, or an empty schedule (nothing ran)
            return
        now = self._clock()
        charged: list[tuple[RequestMetrics, int, int, bool]] = []  # (metrics, prefill, decode, sampled)
        total_prefill = total_decode = 0
        earliest = now  # the earliest first schedule of the batch's live requests
        lookup = billing.billing
        for row in rows:  # a plain loop: it runs per request and batch
            found = lookup(row.request_id)
            num_tokens, start = len(row.token_ids), row.start_position
            if found is None:  # left already: its tokens still count for the fit
                total_decode += num_tokens
                continue
            request, metrics = found
            num_prompt = len(request.prompt_token_ids)
            num_prefill = 0 if start >= num_prompt else min(start + num_tokens, num_prompt) - start
            total_prefill += num_prefill
            total_decode += num_tokens - num_prefill
            charged.append((metrics, num_prefill, num_tokens - num_prefill, row.sample))
            scheduled = request.metrics.first_scheduled_time
            if scheduled is not None and scheduled < earliest:
                earliest = scheduled
        if self._last_apply is None:
            start = earliest
        else:  # busy since the previous apply, or idle until this batch's requests were scheduled
            start = self._last_apply if not charged else max(self._last_apply, earliest)
        interval = max(0.0, now - start)
        self._last_apply = now
        self.busy_s += interval
        batch_usd = interval * self._usd_per_s
        self.fit.add(total_prefill, total_decode, interval)
        if not charged:
            self.unattributed_usd += batch_usd
            return
        w_p, w_d = self.fit.weights
        live_prefill = sum(c[1] for c in charged)
        live_decode = sum(c[2] for c in charged)
        usd_per_weight = batch_usd / (w_p * live_prefill + w_d * live_decode)  # weights > 0, every row has a token
        for metrics, num_prefill, num_decode, _ in charged:
            metrics.cost_usd += (w_p * num_prefill + w_d * num_decode) * usd_per_weight
        self.num_tokens += live_prefill + live_decode
        self.num_output_tokens += sum(c[3] for c in charged)

    def stats(self) -> CostStats | None:
        if self.usd_per_hour is None:
            return None
        total = self.busy_s * self._usd_per_s
        w_p, w_d = self.fit.weights
        return CostStats(
            usd_per_hour=self.usd_per_hour,
            busy_s=self.busy_s,
            cost_usd_total=total,
            unattributed_usd=self.unattributed_usd,
            num_tokens=self.num_tokens,
            num_output_tokens=self.num_output_tokens,
            cost_per_million_tokens_usd=total / self.num_tokens * 1e6 if self.num_tokens else None,
            cost_per_million_output_tokens_usd=total / self.num_output_tokens * 1e6 if self.num_output_tokens
            else None,
            prefill_token_weight=w_p / w_d,
        )

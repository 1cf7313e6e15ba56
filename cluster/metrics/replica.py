"""ReplicaMetrics: the metrics of one LLMServer replica (one engine), kept where they are made.

Data flow: the LLMServer (cluster/server.py) calls `on_finished` once per request, with the engine's
`RequestMetrics` of the final output (TTFT, inter-token latencies, queue time, token counts,
preemptions, cost), and `observe_step` is called by the engine thread after every step (a deque
append: the step loop never waits on a lock or on Ray). Steps are drained into the histograms by
`flush()`, which the replica runs on a timer and before each snapshot, together with the gauges
(running, waiting, KV usage: sampled from `engine.stats()`, never per step). Every value goes to
a private prometheus_client registry (the Ingress's /metrics pulls `snapshot()` from every replica:
cluster/metrics/scrape.py) and to Ray's metrics API (cluster/metrics/ray_export.py).
A request that reached the Ingress before this replica was ready (scale from zero) also records
`cold_start_seconds`: Ingress arrival to first token, by wall clock, and logs it.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric
from shardserve.cluster.metrics import names as n
from shardserve.cluster.metrics.ray_export import RaySink
from shardserve.cluster.metrics.tenant import TenantLabels
from shardserve.workers.protocol import EngineStats
from shardserve.workers.request import RequestMetrics, RequestOutput

# Serve writes this logger to the replica's log file (the root logger stays at WARNING there).
logger = logging.getLogger("ray.serve")
MAX_PENDING_STEPS = 1 << 16  # steps kept between flushes (the oldest go first if nobody flushes)


class ReplicaMetrics:
    def __init__(self, model: str, replica_id: str, ready_unix_s: float | None = None) -> None:
        self.model, self.replica_id = model, replica_id
        self.ready_unix_s = time.time() if ready_unix_s is None else ready_unix_s
        self.registry = CollectorRegistry(auto_describe=False)
        self._prom: dict[str, Any] = {spec.name: _prometheus(spec, self.registry) for spec in n.SPECS}
        self.ray = RaySink(n.SPECS)
        self.tenants = TenantLabels()
        self._steps: deque[tuple[float, int]] = deque(maxlen=MAX_PENDING_STEPS)
        self._base = {n.MODEL: model, n.REPLICA: replica_id}
        self._last_totals: dict[str, float] = {}  # ENGINE_TOTALS as last sampled

    # ---- engine thread ----------------------------------------------------------------------
    def observe_step(self, duration_s: float, batch_size: int) -> None:
        self._steps.append((duration_s, batch_size))

    # ---- replica event loop -------------------------------------------------------------------
    def on_finished(self, out: RequestOutput, tenant: str | None, user: str | None, arrival_unix_s: float) -> None:
        tags = {**self._base, n.TENANT: self.tenants.label(tenant, user)}
        metrics: RequestMetrics | None = out.metrics
        reason = next((c.finish_reason.value for c in out.outputs if c.finish_reason is not None), "stop")
        self._inc(n.SUCCESS, 1, {**tags, n.FINISHED_REASON: reason})
        self._inc(n.PROMPT_TOKENS, len(out.prompt_token_ids), tags)
        self._inc(n.GENERATION_TOKENS, sum(len(c.token_ids) for c in out.outputs), tags)
        if metrics is None:
            self._inc(n.COST, 0.0, tags)
            return
        self._inc(n.COST, metrics.cost_usd, tags)
        for spec, attribute in n.ENGINE_COUNTERS.items():
            self._inc(spec, getattr(metrics, attribute), self._base)
        if metrics.ttft is not None:
            self._observe(n.TTFT, [metrics.ttft], tags)
            self._cold_start(metrics, arrival_unix_s)
        if metrics.inter_token_latencies:
            self._observe(n.ITL, metrics.inter_token_latencies, tags)
        if metrics.queue_time is not None:
            self._observe(n.QUEUE_TIME, [metrics.queue_time], tags)
        end = metrics.finished_time or metrics.last_token_time
        if end is not None:
            self._observe(n.E2E, [end - metrics.arrival_time], tags)

    def _cold_start(self, metrics: RequestMetrics, arrival_unix_s: float) -> None:
        if arrival_unix_s >= self.ready_unix_s or metrics.first_token_time is None:
            return
        first_token_unix_s = time.time() - (time.monotonic() - metrics.first_token_time)
        seconds = first_token_unix_s - arrival_unix_s
        self._observe(n.COLD_START, [seconds], self._base)
        logger.info("cold start: model %s replica %s: request held %.2f s before this replica was ready, "
                    "first token %.2f s after it arrived", self.model, self.replica_id,
                    self.ready_unix_s - arrival_unix_s, seconds)  # fmt: skip

    def set_startup(self, stages: dict[str, float]) -> None:
        for stage, seconds in stages.items():
            tags = {**self._base, n.STAGE: stage}
            self._prom[n.STARTUP.name].labels(**tags).set(seconds)
            self.ray.set(n.STARTUP, seconds, tags)

    def flush(self, stats: EngineStats | None = None) -> None:
        """Drain the steps recorded since the last flush; set the gauges from `stats`."""
        durations, sizes = [], []
        while self._steps:
            duration_s, batch_size = self._steps.popleft()
            durations.append(duration_s)
            sizes.append(float(batch_size))
        self._observe(n.STEP_TIME, durations, self._base)
        self._observe(n.BATCH_SIZE, sizes, self._base)
        if stats is not None:
            for spec, value in ((n.RUNNING, stats.num_running), (n.WAITING, stats.num_waiting),
                                (n.KV_USAGE, stats.kv_cache_usage)):  # fmt: skip
                self._prom[spec.name].labels(**self._base).set(value)
                self.ray.set(spec, value, self._base)
            self._count_totals(stats)

    def _count_totals(self, stats: EngineStats) -> None:
        for spec, read in n.ENGINE_TOTALS.items():
            value = read(stats)
            if value is not None:
                self._inc_total(spec, spec.name, value, self._base)
        if stats.spec_decode is not None:
            for position, value in enumerate(stats.spec_decode.accepted_per_position):
                self._inc_total(n.SPEC_ACCEPTED_PER_POS, f"{n.SPEC_ACCEPTED_PER_POS.name}/{position}", value,
                                {**self._base, n.POSITION: str(position)})

    def _inc_total(self, spec: n.MetricSpec, key: str, value: float, tags: dict[str, str]) -> None:
        """Count what an engine total (since start) grew by since it was last sampled."""
        grown = value - self._last_totals.get(key, 0.0)
        self._last_totals[key] = value
        self._inc(spec, max(grown, 0.0), tags)

    def snapshot(self) -> list[Metric]:
        """Every family of this replica's registry (picklable: the Ingress merges them)."""
        return list(self.registry.collect())

    # ---- both exporters ------------------------------------------------------------------------
    def _inc(self, spec: n.MetricSpec, value: float, tags: dict[str, str]) -> None:
        self._prom[spec.name].labels(**tags).inc(value)  # inc(0) still creates the series
        self.ray.inc(spec, value, tags)

    def _observe(self, spec: n.MetricSpec, values: list[float], tags: dict[str, str]) -> None:
        if not values:
            return
        child = self._prom[spec.name].labels(**tags)
        for value in values:
            child.observe(value)
        self.ray.observe(spec, values, tags)


def _prometheus(spec: n.MetricSpec, registry: CollectorRegistry) -> Any:
    if spec.kind == n.Kind.COUNTER:
        return Counter(spec.full_name, spec.doc, spec.labels, registry=registry)
    if spec.kind == n.Kind.GAUGE:
        return Gauge(spec.full_name, spec.doc, spec.labels, registry=registry)
    return Histogram(spec.full_name, spec.doc, spec.labels, registry=registry, buckets=spec.buckets)

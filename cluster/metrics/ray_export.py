"""Ray's metrics API as a second exporter of the same metric set (cluster/metrics/names.py).

Data flow: the LLMServer replica's `ReplicaMetrics` records each value twice: into its
prometheus_client registry (scraped through the Ingress's /metrics) and here, into
`ray.util.metrics` objects that Ray's metrics agent on the replica's node exports on the node's
metrics port (which the Helm PodMonitor scrapes) as `ray_shardserve_<name>`: Ray's export drops a
name holding a colon without a word (Ray 2.60, measured), so `:` becomes `_` here. Why both: a
Ray cluster's operators already scrape the agents, while /metrics on the API port needs nothing
but the Service. Per-token and per-step histograms (inter-token latency, step time, batch size)
stay off Ray (`MetricSpec.ray_export`): its observe() is ~20x prometheus_client's. Outside a Ray
worker (unit tests, offline use) the sink is off: no Ray call.
"""

from __future__ import annotations

import logging
from typing import Any

from shardserve.cluster.metrics.names import Kind, MetricSpec

logger = logging.getLogger(__name__)


def ray_name(spec: MetricSpec) -> str:
    """The name given to Ray (its export adds the `ray_` prefix, and `_total` to counters)."""
    return spec.full_name.replace(":", "_")


class RaySink:
    def __init__(self, specs: tuple[MetricSpec, ...]) -> None:
        self._metrics: dict[str, Any] = {}
        try:
            import ray
            from ray.util import metrics

            if not ray.is_initialized():
                return
            for spec in (s for s in specs if s.ray_export):
                name = ray_name(spec)
                if spec.kind == Kind.COUNTER:
                    metric = metrics.Counter(name, spec.doc, tag_keys=spec.labels)
                elif spec.kind == Kind.GAUGE:
                    metric = metrics.Gauge(name, spec.doc, tag_keys=spec.labels)
                else:
                    metric = metrics.Histogram(name, spec.doc, list(spec.buckets), tag_keys=spec.labels)
                self._metrics[spec.name] = metric
        except Exception as err:  # never let the export take the replica down
            logger.warning("Ray metrics export is off: %r", err)
            self._metrics.clear()

    @property
    def enabled(self) -> bool:
        return bool(self._metrics)

    def inc(self, spec: MetricSpec, value: float, tags: dict[str, str]) -> None:
        if value > 0 and spec.name in self._metrics:  # Ray's Counter refuses 0
            self._metrics[spec.name].inc(value, tags)

    def set(self, spec: MetricSpec, value: float, tags: dict[str, str]) -> None:
        if spec.name in self._metrics:
            self._metrics[spec.name].set(value, tags)

    def observe(self, spec: MetricSpec, values: list[float], tags: dict[str, str]) -> None:
        metric = self._metrics.get(spec.name)
        if metric is not None:
            for value in values:
                metric.observe(value, tags)

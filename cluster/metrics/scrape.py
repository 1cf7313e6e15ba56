"""The Ingress's GET /metrics: one scrape shows every LLMServer replica of the app.

Data flow: the route calls `render(handles, deployment_names)`. For each model it lists the
running replicas (cluster/replicas.py: the router's live view, else Serve's status) and calls `LLMServer.metrics_snapshot(replica_id=...)` on each through the
DeploymentHandle (the router pins the call; the answer names the replica that answered, so a
missed pin is dropped as a duplicate). The replicas' prometheus_client families are merged by
name (their `model` / `replica` labels keep the series apart) and rendered in Prometheus' text
format with `generate_latest`, beside `shardserve:num_replicas{model}`. A model with no running
replica is not called (a scrape never wakes a deployment scaled to zero); a replica that does not
answer within `SNAPSHOT_TIMEOUT_S` is left out of that scrape (its series go stale). Every Ingress
replica answers the same whole-app view, so it does not matter which one the Service picks.
A replica's counters start at zero when it starts: Prometheus' rate() treats that as a reset.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from shardserve.cluster.metrics.names import MODEL, PREFIX
from shardserve.cluster.replicas import running_replicas

logger = logging.getLogger(__name__)
SNAPSHOT_TIMEOUT_S = 5.0
CONTENT_TYPE = CONTENT_TYPE_LATEST


async def render(handles: dict[str, Any], deployment_names: dict[str, str]) -> bytes:
    replicas = GaugeMetricFamily(PREFIX + "num_replicas", "Running LLMServer replicas of the model, as this "
                                 "Ingress's router sees them.", labels=[MODEL])  # fmt: skip
    snapshots: list[dict[str, Any]] = []
    for model, handle in handles.items():
        replica_ids = await running_replicas(deployment_names[model])
        replicas.add_metric([model], len(replica_ids))
        calls = [_snapshot(handle, replica_id) for replica_id in replica_ids]
        snapshots.extend(s for s in await asyncio.gather(*calls) if s is not None)
    families = merge(snapshots)
    families.append(replicas)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return generate_latest(registry)


def merge(snapshots: list[dict[str, Any]]) -> list[Metric]:
    """One family per name holding every replica's samples; one snapshot per replica id."""
    merged: dict[str, Metric] = {}
    seen: set[str] = set()
    for snapshot in snapshots:
        if snapshot["replica_id"] in seen:
            continue
        seen.add(snapshot["replica_id"])
        for family in snapshot["families"]:
            target = merged.get(family.name)
            if target is None:
                target = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            target.samples.extend(family.samples)
    return list(merged.values())


async def _snapshot(handle: Any, replica_id: str | None) -> dict[str, Any] | None:
    """One replica's families; `replica_id` None (ids not known yet): whichever replica answers."""
    try:
        return await asyncio.wait_for(handle.metrics_snapshot.remote(replica_id=replica_id), SNAPSHOT_TIMEOUT_S)
    except Exception as err:  # a replica going away or stuck: leave it out of this scrape
        logger.warning("metrics of replica %s left out of this scrape: %r", replica_id or "(any)", err)
        return None


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families

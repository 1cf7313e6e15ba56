"""Waking a deployment scaled to zero at once, instead of after Serve's next metrics round.

Data flow: IngressCore.stream calls `Waker.maybe_wake(model)` before it sends a request. When the
model may scale to zero (`autoscaling.min_replicas: 0`) and this Ingress's router, which has served
it before, sees no running replica, the request will be held at the handle until Serve starts one.
Serve decides that from handle metrics; its immediate push at zero replicas sends the handle's
recorded history when it has one, not the request just queued, so a handle with earlier traffic
waits for its next record and push (~6.5 s measured on CPU, Ray 2.60). A fresh handle has no
history: the Waker sends one `health` call through a new DeploymentHandle (one at a time per
model), whose first push carries it, then shuts that handle down once a replica answered. The
request itself still goes through the Ingress's own handle (prefix-affinity router).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from shardserve.cluster.config import AppConfig
from shardserve.cluster.router import running_replica_ids

logger = logging.getLogger("ray.serve")
WAKE_TIMEOUT_S = 600.0  # the longest a replica may take to start before the waker gives up


class Waker:
    def __init__(self, config: AppConfig, deployment_names: dict[str, str]) -> None:
        self._deployments = {
            m.name: deployment_names[m.name]
            for m in config.models
            if m.autoscaling is not None and m.autoscaling.min_replicas == 0 and m.name in deployment_names
        }
        self._waking: dict[str, asyncio.Task] = {}

    def maybe_wake(self, model: str) -> None:
        deployment = self._deployments.get(model)
        if deployment is None or running_replica_ids(deployment) != [] or model in self._waking:
            return  # not scalable to zero, a replica runs, never routed here yet (Serve's own path), or waking
        task = asyncio.get_running_loop().create_task(self._wake(model, deployment))
        self._waking[model] = task
        task.add_done_callback(lambda _: self._waking.pop(model, None))

    async def _wake(self, model: str, deployment: str) -> None:
        from ray import serve

        handle: Any = serve.get_deployment_handle(deployment, app_name=serve.get_replica_context().app_name)
        try:
            await asyncio.wait_for(handle.health.remote(), WAKE_TIMEOUT_S)
        except Exception as err:  # the held request reports its own outcome; this is only a nudge
            logger.warning("waking %s (scaled to zero) failed: %r", model, err)
        finally:
            await handle.shutdown_async()

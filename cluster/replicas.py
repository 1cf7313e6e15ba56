"""Which LLMServer replicas run now, as the Ingress sees them, without sending them a request.

Data flow: the Ingress's /metrics (cluster/metrics/scrape.py) and its health checks
(cluster/ingress/core.py) ask before they call a deployment: a call to a deployment scaled to zero
would be held at the handle and start a replica (Serve's scale-from-zero), so an idle app would
never stay at zero. The answer is the prefix-affinity router's live replica set (cluster/router.py),
or, before this process has a router for the deployment (no call through its handle yet), the
count of RUNNING replicas in Serve's status (one controller call; the ids are then unknown: None).
Scale from zero: Serve holds the request at the handle and starts a replica once the handle's
metrics reach the controller; cluster/ingress/wake.py makes that immediate after earlier traffic.
"""

from __future__ import annotations

import asyncio

from shardserve.cluster.router import running_replica_ids


async def running_replicas(deployment_name: str) -> list[str | None]:
    ids = running_replica_ids(deployment_name)
    if ids is not None:
        return list(ids)
    from ray import serve

    app = serve.get_replica_context().app_name
    status = await asyncio.to_thread(serve.status)
    application = status.applications.get(app)
    deployment = None if application is None else application.deployments.get(deployment_name)
    running = 0 if deployment is None else deployment.replica_states.get("RUNNING", 0)
    return [None] * running

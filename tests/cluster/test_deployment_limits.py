"""The deployed apps' concurrency limits, read back from the running Serve controller.

Ray Serve's default `max_ongoing_requests` is 5 per replica; a deployment left at that default
would cap every stream behind it at 5 in flight, whatever the engine can batch. The limits are
read from the controller's view of the running app (what Serve enforces), not from our constants.
"""

from __future__ import annotations

from shardserve.cluster.ingress.deployment import llm_server_name


def _deployments(app_name: str) -> dict:
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    return details["applications"][app_name]["deployments"]


def test_llm_server_and_ingress_admit_the_configured_concurrency(cluster):
    deployments = _deployments(cluster.app_name)
    total = 0
    for index, model in enumerate(cluster.config.models):
        limit = deployments[llm_server_name(index, model.name)]["deployment_config"]["max_ongoing_requests"]
        # Serve must never refuse what the engine would run or queue: the engine answers "queue full".
        concurrency = model.scheduler.max_num_seqs + model.scheduler.max_queue_len
        assert limit >= concurrency, (model.name, limit, concurrency)
        total += concurrency * model.num_replicas
    ingress = deployments["Ingress"]["deployment_config"]
    # The Ingress relays every stream of every model at once (each replica may get them all).
    assert ingress["max_ongoing_requests"] >= total

"""build_app(config) -> serve.Application: one Ingress in front of one LLMServer deployment per model.

Data flow: a validated `AppConfig` (from `shardserve serve`, or `app_builder(args)` when a Serve
config file / RayService names `import_path: shardserve.cluster.app:app_builder`) becomes:
  - per model, an LLMServer deployment (cluster/server.py) named `LLMServer_<i>_<name>`, with
    `num_replicas` or an `autoscaling_config`, the prefix-affinity request router
    (cluster/router.py) configured from the model's `router` section, and resources for one
    worker group: the replica's actor takes one rank's CPUs/GPUs and, when tp × pp > 1, a
    placement group reserves one bundle per rank (PACK: a two-node group is allowed);
  - one Ingress deployment (cluster/ingress/deployment.py) bound to a handle per model; it serves
    the OpenAI HTTP API and the gRPC servicer.
HTTP and gRPC ports are proxy settings, not part of the Application: `serve_options(config)` gives
the `serve.start` arguments (`shardserve serve` uses them; a RayService sets them in its spec).
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig
from shardserve.cluster.config import AppConfig, ModelSection, ServeConfig, parse_config
from shardserve.cluster.ingress.deployment import Ingress, llm_server_name
from shardserve.cluster.proto import SERVICER_FUNCTION
from shardserve.cluster.router import PrefixAffinityRouter
from shardserve.cluster.server import LLMServer

ROUTING_STATS_PERIOD_S = 2.0
INGRESS_MAX_ONGOING_REQUESTS = 4096
# Serve's per-replica cap sits above the engine's own (running + waiting), so the engine answers
# "queue full" (429) itself and stats / health calls still reach a busy replica.
CONTROL_HEADROOM = 32


def llm_server_options(index: int, model: ModelSection) -> dict[str, Any]:
    res = model.resources
    options: dict[str, Any] = {
        "name": llm_server_name(index, model.name),
        "max_ongoing_requests": model.scheduler.max_num_seqs + model.scheduler.max_queue_len + CONTROL_HEADROOM,
        "ray_actor_options": {"num_cpus": res.num_cpus_per_worker, "num_gpus": res.num_gpus_per_worker},
        "request_router_config": RequestRouterConfig(
            request_router_class=PrefixAffinityRouter,
            request_router_kwargs={
                "prefix_affinity": model.router.prefix_affinity,
                "max_load_imbalance": model.router.max_load_imbalance,
            },
            request_routing_stats_period_s=ROUTING_STATS_PERIOD_S,
        ),
    }
    if model.autoscaling is not None:
        options["autoscaling_config"] = {
            "min_replicas": model.autoscaling.min_replicas,
            "max_replicas": model.autoscaling.max_replicas,
            "target_ongoing_requests": model.autoscaling.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = model.num_replicas
    bundle = {k: v for k, v in (("CPU", res.num_cpus_per_worker), ("GPU", res.num_gpus_per_worker)) if v > 0}
    if model.world_size > 1 and bundle:
        options["placement_group_bundles"] = [dict(bundle) for _ in range(model.world_size)]
        options["placement_group_strategy"] = "PACK"
    return options


def build_app(config: AppConfig) -> serve.Application:
    handles = {}
    for i, model in enumerate(config.models):
        deployment = serve.deployment(LLMServer).options(**llm_server_options(i, model))
        handles[model.name] = deployment.bind(model.model_dump(mode="json"))
    app_config = config.model_dump(mode="json", exclude={"ray"})
    ingress = serve.deployment(Ingress).options(name="Ingress", max_ongoing_requests=INGRESS_MAX_ONGOING_REQUESTS)
    return ingress.bind(app_config, handles)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Serve config / RayService entry point: `import_path: shardserve.cluster.app:app_builder`."""
    return build_app(parse_config(args, AppConfig))


def serve_options(config: ServeConfig | AppConfig) -> dict[str, Any]:
    """Keyword arguments of `serve.start` for this config (proxy ports, gRPC servicer)."""
    from ray.serve.config import HTTPOptions, gRPCOptions

    return {
        "http_options": HTTPOptions(host=config.http.host, port=config.http.port),
        "grpc_options": gRPCOptions(port=config.grpc.port, grpc_servicer_functions=[SERVICER_FUNCTION]),
    }

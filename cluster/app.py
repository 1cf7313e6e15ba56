"""build_app(config) -> serve.Application: one Ingress in front of one LLMServer deployment per model.

Data flow: a validated `AppConfig` (from `shardserve serve`, or `app_builder(args)` when a Serve
config file / RayService names `import_path: shardserve.cluster.app:app_builder`) becomes:
  - per model, an LLMServer deployment (cluster/server.py) named `LLMServer_<i>_<name>`, with
    `num_replicas` or an `autoscaling_config`, the prefix-affinity router (cluster/router.py) and
    resources for one worker group: with tp × pp = 1 the replica runs the model itself; otherwise
    it is the engine's driver (CPUs only; with a draft model on GPU ranks, a sliver of rank 0's
    GPU: the draft runs in the driver) and a placement group reserves one bundle per rank
    (bundle 0 shared with the replica; STRICT_PACK for one stage, PACK when stages may span nodes);
  - one Ingress deployment (cluster/ingress/deployment.py) bound to a handle per model: the OpenAI
    HTTP API (through Serve's HTTP proxy; with mutual TLS itself: http_server.py) and its own gRPC
    server (cluster/ingress/grpc_server.py). Its replicas sit on the Ray head node (where the Helm
    chart's Services point) and share the ports with SO_REUSEPORT.
`build_app(config, engine_factory=...)` is the tests' way in (fake engines, tests/doubles/).
`serve_options(config)` gives the `serve.start` arguments (HTTP port, HTTPS files: proxy settings,
not part of the Application; a RayService sets them in its spec): no gRPC proxy, and with mutual
TLS (`tls.require_client_auth`) no HTTP proxy either.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig
from shardserve.cluster.config import AppConfig, ModelSection, ServeConfig, parse_config
from shardserve.cluster.ingress.deployment import Ingress, llm_server_name
from shardserve.cluster.ingress.tls import http_ssl_options, ingress_serves_http
from shardserve.cluster.router import PrefixAffinityRouter
from shardserve.cluster.server import EngineFactory, LLMServer

ROUTING_STATS_PERIOD_S = 2.0
# Ray's built-in resource of the head node (ray._common.constants.HEAD_NODE_RESOURCE_NAME).
HEAD_NODE_RESOURCE = "node:__internal_head__"
INGRESS_ACTOR_OPTIONS = {"num_cpus": 0, "resources": {HEAD_NODE_RESOURCE: 0.001}}
INGRESS_MIN_ONGOING_REQUESTS = 4096
# Serve's per-replica cap sits above the engine's own (running + waiting), so the engine answers
# "queue full" (429) itself and stats / health calls still reach a busy replica.
CONTROL_HEADROOM = 32
# Of bundle 0's GPU, what a worker group's replica takes when it runs a draft model (`driver_gpus`).
DRAFT_DRIVER_GPU_SHARE = 0.01
# Ray Serve's own switches for every Serve process, read from the environment when Ray starts it:
# user code on the replica's main loop and the handle's router on the caller's loop (two thread
# hops fewer per request and per streamed message), and the HTTP proxy calling the Ingress over
# gRPC by value (no Ray object per message). With by-value LLMServer calls (IngressCore) they cut
# about a third of the latency the serving path adds (benchmarks/README.md, serve_latency_ab.sh).
# Set through the environment, not a runtime_env: while Serve's gRPC proxy existed, a runtime_env
# on the replicas coincided with it segfaulting in Ray core (ray-project/ray#39703, #43771); the
# Ingress serves gRPC itself now. The Helm chart sets them too (rayServe.env).
SERVE_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_PROXY_USE_GRPC": "1",
}


@contextlib.contextmanager
def serve_env() -> Iterator[None]:
    """Wrap `ray.init` of a local Ray in this: the raylet it starts, and so every Serve process
    it spawns, inherits SERVE_ENV (values already in the environment win). The caller's own
    process gets its environment back, so its handles keep Serve's defaults (a router on a
    separate loop: synchronous `.result()` calls keep working)."""
    saved = {k: os.environ.get(k) for k in SERVE_ENV}
    for key, value in SERVE_ENV.items():
        os.environ.setdefault(key, value)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def llm_server_options(index: int, model: ModelSection) -> dict[str, Any]:
    res = model.resources
    options: dict[str, Any] = {
        "name": llm_server_name(index, model.name),
        "max_ongoing_requests": model.scheduler.max_num_seqs + model.scheduler.max_queue_len + CONTROL_HEADROOM,
        "health_check_period_s": model.health_check_period_s,
        "health_check_timeout_s": model.health_check_timeout_s,
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
            "upscale_delay_s": model.autoscaling.upscale_delay_s,
            "downscale_delay_s": model.autoscaling.downscale_delay_s,
            "look_back_period_s": model.autoscaling.look_back_period_s,
        }
    else:
        options["num_replicas"] = model.num_replicas
    if model.world_size > 1:
        options["ray_actor_options"] = {"num_cpus": res.num_cpus_per_worker, "num_gpus": driver_gpus(model)}
        bundles = worker_group_bundles(model)
        if bundles:
            options["placement_group_bundles"] = bundles
            options["placement_group_strategy"] = "STRICT_PACK" if model.parallel.pipeline_parallel_size == 1 else "PACK"
    return options


def driver_gpus(model: ModelSection) -> float:
    """The GPU share of a worker group's replica (its driver): none, unless it runs a draft model
    (speculative method `draft`: at TP 1 in the driver, on the driver's device) on GPU ranks; then
    DRAFT_DRIVER_GPU_SHARE of bundle 0's GPU, so the driver sees rank 0's GPU (the ranks keep the rest)."""
    if model.speculative.to_engine().speculative_method == "draft" and model.resources.num_gpus_per_worker > 0:
        return DRAFT_DRIVER_GPU_SHARE
    return 0


def worker_group_bundles(model: ModelSection) -> list[dict[str, float]]:
    """One bundle per rank; bundle 0 also holds the replica (the engine's driver: CPUs, and `driver_gpus`).

    The replica's RayExecutor (workers/group.py) finds this placement group and starts rank r's
    actor in bundle r with what is left of it: `num_cpus_per_worker` CPUs and `num_gpus_per_worker`
    GPUs each. Empty when a rank asks for nothing (the executor then reserves its own group).
    """
    res = model.resources

    def bundle(num_cpus: float) -> dict[str, float]:
        return {k: v for k, v in (("CPU", num_cpus), ("GPU", res.num_gpus_per_worker)) if v > 0}

    first, rank = bundle(2 * res.num_cpus_per_worker), bundle(res.num_cpus_per_worker)
    return [first] + [dict(rank) for _ in range(model.world_size - 1)] if rank else []


def ingress_max_ongoing_requests(config: AppConfig) -> int:
    """Every Ingress replica must admit every stream the LLMServers can hold (running + queued, at
    the most replicas), or Serve would queue requests in front of idle engines; the proxy does not
    balance Ingress replicas exactly, so each gets the whole total, plus the control headroom."""
    total = 0
    for model in config.models:
        replicas = model.autoscaling.max_replicas if model.autoscaling is not None else model.num_replicas
        total += replicas * (model.scheduler.max_num_seqs + model.scheduler.max_queue_len)
    return max(INGRESS_MIN_ONGOING_REQUESTS, total + CONTROL_HEADROOM)


def build_app(config: AppConfig, engine_factory: EngineFactory | None = None) -> serve.Application:
    """The Application; `engine_factory` (Python callers only: tests) replaces every model's real engine."""
    handles = {}
    for i, model in enumerate(config.models):
        deployment = serve.deployment(LLMServer).options(**llm_server_options(i, model))
        handles[model.name] = deployment.bind(model.model_dump(mode="json"), engine_factory)
    app_config = config.model_dump(mode="json", exclude={"ray"})
    ingress = serve.deployment(Ingress).options(
        name="Ingress",
        num_replicas=config.ingress.num_replicas,
        max_ongoing_requests=ingress_max_ongoing_requests(config),
        ray_actor_options=INGRESS_ACTOR_OPTIONS,
    )
    return ingress.bind(app_config, handles)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Serve config / RayService entry point: `import_path: shardserve.cluster.app:app_builder`."""
    return build_app(parse_config(args, AppConfig))


def serve_options(config: ServeConfig | AppConfig) -> dict[str, Any]:
    """Keyword arguments of `serve.start` for this config (HTTP proxy port and HTTPS files).

    No gRPC servicer functions: Serve starts no gRPC proxy; the Ingress serves gRPC itself. With
    mutual TLS no HTTP proxy either: the Ingress replicas serve HTTPS (cluster/ingress/http_server.py).
    """
    from ray.serve.config import HTTPOptions, ProxyLocation, gRPCOptions

    options: dict[str, Any] = {
        "http_options": HTTPOptions(host=config.http.host, port=config.http.port, **http_ssl_options(config.tls)),
        "grpc_options": gRPCOptions(grpc_servicer_functions=[]),
    }
    if ingress_serves_http(config.tls):
        options["proxy_location"] = ProxyLocation.Disabled  # the Ingress replicas serve HTTP (mutual TLS)
    return options

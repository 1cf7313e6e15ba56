"""Each request's measured cost through the real app (real SmolLM2 engine, priced at cost.cpu_hour_usd):
`usage.cost_usd` on HTTP (plain and streamed with include_usage), `Usage.cost_usd` on gRPC, the sum of what
the requests were told equal to what the engine measured, the model's cost on /v1/stats; an unpriced model
(the fake-engine app) sends no cost at all."""

from __future__ import annotations

import time

import grpc
import pytest
import requests
from real_app import MODEL, ROUTE_PREFIX, SECTION, http_client, llm_stats
from shardserve.cluster.proto import llm_pb2 as pb
from shardserve.cluster.proto import llm_pb2_grpc as rpc

pytestmark = pytest.mark.slow


def _wait_idle(real) -> dict:
    deadline = time.time() + 60
    while (stats := llm_stats(real))["num_running"] or stats["num_waiting"]:
        assert time.time() < deadline, f"the real engine is still busy: {stats}"
        time.sleep(0.2)
    return stats


def test_costs_reach_http_and_grpc_and_add_up_to_the_engines(real):
    before = _wait_idle(real)["cost"]
    assert before["usd_per_hour"] == SECTION["cost"]["cpu_hour_usd"] * SECTION["resources"]["num_cpus_per_worker"]
    client = http_client(real)
    short = client.completions.create(model=MODEL, prompt="Hi", max_tokens=1, temperature=0)
    long = client.completions.create(model=MODEL, prompt="The quick brown fox jumps over the lazy dog. " * 4,
                                     max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    costs = [short.usage.model_dump()["cost_usd"], long.usage.model_dump()["cost_usd"]]
    assert 0 < costs[0] < costs[1], costs  # more tokens cost more
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 2
    costs.append(chunks[-1].usage.model_dump()["cost_usd"])
    with grpc.insecure_channel(real.grpc_target) as channel:
        stub = rpc.LLMServiceStub(channel)
        req = pb.GenerateRequest(model=MODEL, prompt="The capital of France is",
                                 params=pb.SamplingParams(max_tokens=2, temperature=0))  # fmt: skip
        unary = stub.Generate(req)
        parts = list(stub.GenerateStream(req))
    assert unary.usage.HasField("cost_usd") and parts[-1].usage.HasField("cost_usd")
    assert not parts[0].usage.HasField("cost_usd")  # usage (and cost) only on the final message
    costs += [unary.usage.cost_usd, parts[-1].usage.cost_usd]
    assert all(c > 0 for c in costs), costs
    after = _wait_idle(real)["cost"]
    # One request at a time: what the five were told is what the engine measured busy x price.
    measured = (after["cost_usd_total"] - before["cost_usd_total"]) - (after["unattributed_usd"]
                                                                       - before["unattributed_usd"])
    assert sum(costs) == pytest.approx(measured, rel=0.01), (costs, before, after)
    deadline = time.time() + 30  # the Ingress sees replica stats Serve polls every 2 s
    while True:
        stats = requests.get(real.http_url + ROUTE_PREFIX + "/v1/stats", timeout=30).json()["models"][MODEL]["cost"]
        if stats is not None and stats["cost_usd_total"] >= after["cost_usd_total"]:
            break
        assert time.time() < deadline, f"/v1/stats never showed the model's cost: {stats}"
        time.sleep(0.5)
    assert stats["cost_per_million_output_tokens_usd"] == pytest.approx(
        stats["cost_usd_total"] / stats["num_output_tokens"] * 1e6)


def test_unpriced_model_sends_no_cost(cluster):
    body = requests.post(cluster.http_url + "/v1/completions", json={"model": "fake", "prompt": "Hi", "max_tokens": 2},
                         timeout=60).json()
    assert body["usage"]["completion_tokens"] == 2 and "cost_usd" not in body["usage"]
    with grpc.insecure_channel(cluster.grpc_target) as channel:
        resp = rpc.LLMServiceStub(channel).Generate(
            pb.GenerateRequest(model="fake", prompt="Hi", params=pb.SamplingParams(max_tokens=2)))
    assert resp.usage.completion_tokens == 2 and not resp.usage.HasField("cost_usd")
    stats = requests.get(cluster.http_url + "/v1/stats", timeout=30).json()["models"]["fake"]
    assert stats["cost"] is None

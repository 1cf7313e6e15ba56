"""ReplicaMetrics without Ray: what one finished request and a few engine steps put in the registry,
the tenant label's bound on client-chosen `user` values, a cold start only for requests that
arrived before the replica was ready, and the Ingress's merge of two replicas' snapshots.
(The whole path, real engine and Ray included: tests/cluster/test_metrics.py.)"""

from __future__ import annotations

import time

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from shardserve.cluster.metrics.replica import ReplicaMetrics
from shardserve.cluster.metrics.scrape import merge
from shardserve.cluster.metrics.tenant import MAX_TENANT_CHARS, OTHER_TENANT, TenantLabels
from shardserve.workers.protocol import EngineStats
from shardserve.workers.request import CompletionOutput, FinishReason, RequestMetrics, RequestOutput


def finished(num_prompt: int, num_tokens: int, arrival: float, cost: float = 0.25) -> RequestOutput:
    metrics = RequestMetrics(arrival_time=arrival, first_scheduled_time=arrival + 0.5, num_prompt_tokens=num_prompt,
                             num_cached_prompt_tokens=2, num_preemptions=1, cost_usd=cost)  # fmt: skip
    for i in range(num_tokens):
        metrics.record_token(arrival + 1.0 + 0.1 * i)
    metrics.finished_time = metrics.last_token_time
    ids = tuple(range(num_tokens))
    completion = CompletionOutput(0, "x" * num_tokens, ids, "", (), FinishReason.LENGTH)
    return RequestOutput("r1", "p", tuple(range(num_prompt)), (completion,), True, metrics)


def values(metrics: ReplicaMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip


def test_one_finished_request_and_steps():
    metrics = ReplicaMetrics("m", "rep", ready_unix_s=time.time() - 60)
    now = time.monotonic()
    metrics.on_finished(finished(7, 4, now - 2.0), tenant="team", user="ignored", arrival_unix_s=time.time() - 2.0)
    for duration in (0.01, 0.02, 0.03):
        metrics.observe_step(duration, 3)
    metrics.flush(EngineStats(2, 1, 0.5, 0.0, 0, 0.0, 0.0, 1, 7, 4))
    got = values(metrics)
    tenant = (("model", "m"), ("replica", "rep"), ("tenant", "team"))
    replica = (("model", "m"), ("replica", "rep"))
    assert got[("shardserve:prompt_tokens_total", tenant)] == 7
    assert got[("shardserve:generation_tokens_total", tenant)] == 4
    assert got[("shardserve:cost_usd_total", tenant)] == 0.25
    assert got[("shardserve:request_success_total", (("finished_reason", "length"), *tenant))] == 1
    assert got[("shardserve:time_to_first_token_seconds_sum", tenant)] == 1.0
    assert got[("shardserve:inter_token_latency_seconds_count", tenant)] == 3
    assert abs(got[("shardserve:inter_token_latency_seconds_sum", tenant)] - 0.3) < 1e-9
    assert got[("shardserve:request_queue_time_seconds_sum", tenant)] == 0.5
    assert abs(got[("shardserve:e2e_request_latency_seconds_sum", tenant)] - 1.3) < 1e-9
    assert got[("shardserve:prefix_cache_queries_total", replica)] == 7
    assert got[("shardserve:prefix_cache_hits_total", replica)] == 2
    assert got[("shardserve:num_preemptions_total", replica)] == 1
    assert got[("shardserve:step_time_seconds_count", replica)] == 3
    assert got[("shardserve:batch_size_sum", replica)] == 9
    assert (got[("shardserve:num_requests_running", replica)], got[("shardserve:num_requests_waiting", replica)]) == (2, 1)
    assert got[("shardserve:kv_cache_usage_perc", replica)] == 0.5
    assert ("shardserve:cold_start_seconds_count", replica) not in got  # arrived after the replica was ready


def test_a_request_that_waited_for_the_replica_is_a_cold_start():
    metrics = ReplicaMetrics("m", "rep")
    metrics.on_finished(finished(3, 2, time.monotonic() - 1.5), None, None, arrival_unix_s=time.time() - 12.0)
    got = values(metrics)
    replica = (("model", "m"), ("replica", "rep"))
    assert got[("shardserve:cold_start_seconds_count", replica)] == 1
    # arrival 12 s ago, first token 0.5 s ago (engine clock): 11.5 s
    assert abs(got[("shardserve:cold_start_seconds_sum", replica)] - 11.5) < 0.2
    assert got[("shardserve:request_success_total", (("finished_reason", "length"), *replica, ("tenant", "")))] == 1


def test_tenant_label_is_the_key_then_the_bounded_user_field():
    labels = TenantLabels(max_tenants=2)
    assert labels.label("key-name", "someone") == "key-name"
    assert labels.label(None, None) == "" and labels.label(None, "") == ""
    assert labels.label(None, "u" * 500) == "u" * MAX_TENANT_CHARS
    assert labels.label(None, "bob") == "bob"
    assert labels.label(None, "carol") == OTHER_TENANT  # a third distinct user: over the bound
    assert labels.label(None, "bob") == "bob"


def test_merge_keeps_one_snapshot_per_replica():
    a, b = ReplicaMetrics("m", "a"), ReplicaMetrics("m", "b")
    for metrics in (a, b):
        metrics.on_finished(finished(5, 2, time.monotonic() - 1.0), "t", None, arrival_unix_s=time.time())
    snapshots = [{"replica_id": r.replica_id, "families": r.snapshot()} for r in (a, b, a)]  # a's pin missed once
    families = {f.name: f for f in merge(snapshots)}
    prompt = [s for s in families["shardserve:prompt_tokens"].samples if s.name.endswith("_total")]
    assert sorted((s.labels["replica"], s.value) for s in prompt) == [("a", 5.0), ("b", 5.0)]


def test_engine_totals_become_counters(monkeypatch):
    """ENGINE_TOTALS (where spec_decode_* will go): each sample adds what the engine's total grew by."""
    from shardserve.cluster.metrics import names

    spec = names.MetricSpec("test_generated", names.Kind.COUNTER, "Engine total, for this test.")
    monkeypatch.setattr(names, "ENGINE_TOTALS", {spec: lambda s: s.total_generation_tokens})
    monkeypatch.setattr(names, "SPECS", (*names.SPECS, spec))
    metrics = ReplicaMetrics("m", "rep")
    for total_generated in (4, 10, 10):
        metrics.flush(EngineStats(0, 0, 0.0, 0.0, 0, 0.0, 0.0, 1, 7, total_generated))
    assert values(metrics)[("shardserve:test_generated_total", (("model", "m"), ("replica", "rep")))] == 10

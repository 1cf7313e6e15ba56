"""The metric set: names (vLLM's under `shardserve:`), kinds, labels and histogram buckets.

One table (`SPECS`) that both exporters read: the prometheus_client registry of each LLMServer
replica (cluster/metrics/replica.py, scraped through the Ingress's /metrics) and Ray's metrics API
(cluster/metrics/ray_export.py, exported by every Ray node's metrics agent). Buckets are vLLM's
(vllm/v1/metrics/loggers.py), so dashboards and SLO queries written for vLLM read ours unchanged.
Engine statistics grow in two named places: `ENGINE_COUNTERS` (fed from each finished request's
RequestMetrics) and `ENGINE_TOTALS` (counters fed from the engine's running totals in EngineStats,
sampled on scrape: where speculative decoding's `spec_decode_*` counters go).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from shardserve.workers.protocol import EngineStats

PREFIX = "shardserve:"
MODEL, REPLICA, TENANT, FINISHED_REASON, STAGE = "model", "replica", "tenant", "finished_reason", "stage"
POSITION = "position"  # a draft token's position in its draft, 0 = first
REPLICA_LABELS = (MODEL, REPLICA)
TENANT_LABELS = (MODEL, REPLICA, TENANT)


class Kind(str, enum.Enum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


@dataclass(frozen=True)
class MetricSpec:
    name: str  # without PREFIX; counters without the `_total` suffix (prometheus_client adds it)
    kind: Kind
    doc: str
    labels: tuple[str, ...] = REPLICA_LABELS
    buckets: tuple[float, ...] = ()
    # Also through Ray's metrics API. Off for the values recorded per token or per step: Ray's
    # observe() costs ~18 us a value in a replica (prometheus_client's ~0.8 us, measured on CPU).
    ray_export: bool = True

    @property
    def full_name(self) -> str:
        return PREFIX + self.name


TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
# Engine steps: 1 ms (a decode step on a GPU) to 10 s (a long prefill on a CPU).
STEP_TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                     0.5, 0.75, 1.0, 2.5, 5.0, 10.0)  # fmt: skip
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
COLD_START_BUCKETS = (0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 300.0)

TTFT = MetricSpec("time_to_first_token_seconds", Kind.HISTOGRAM, "Time to first token (engine arrival to first "
                  "output token), seconds.", TENANT_LABELS, TTFT_BUCKETS)  # fmt: skip
ITL = MetricSpec("inter_token_latency_seconds", Kind.HISTOGRAM, "Time between two output tokens, seconds.",
                 TENANT_LABELS, ITL_BUCKETS, ray_export=False)  # fmt: skip
E2E = MetricSpec("e2e_request_latency_seconds", Kind.HISTOGRAM, "Request latency in the engine, arrival to "
                 "finish, seconds.", TENANT_LABELS, REQUEST_LATENCY_BUCKETS)  # fmt: skip
QUEUE_TIME = MetricSpec("request_queue_time_seconds", Kind.HISTOGRAM, "Time waiting before first scheduled, "
                        "seconds.", TENANT_LABELS, REQUEST_LATENCY_BUCKETS)  # fmt: skip
STEP_TIME = MetricSpec("step_time_seconds", Kind.HISTOGRAM, "Wall time of one engine step, seconds.",
                       buckets=STEP_TIME_BUCKETS, ray_export=False)
BATCH_SIZE = MetricSpec("batch_size", Kind.HISTOGRAM, "Requests that advanced in one engine step.",
                        buckets=BATCH_SIZE_BUCKETS, ray_export=False)
COLD_START = MetricSpec("cold_start_seconds", Kind.HISTOGRAM, "Requests that arrived before their replica was "
                        "ready (scale from zero, or up): Ingress arrival to first token, seconds.",
                        buckets=COLD_START_BUCKETS)  # fmt: skip
STARTUP = MetricSpec("replica_startup_seconds", Kind.GAUGE, "How long each start-up stage of this replica took "
                     "(process: Ray actor start and imports; engine: weights, KV sizing, warm-up), seconds.",
                     (MODEL, REPLICA, STAGE))  # fmt: skip
RUNNING = MetricSpec("num_requests_running", Kind.GAUGE, "Requests in the engine's running batch.")
WAITING = MetricSpec("num_requests_waiting", Kind.GAUGE, "Requests waiting in the engine's queue.")
KV_USAGE = MetricSpec("kv_cache_usage_perc", Kind.GAUGE, "Fraction of KV cache blocks in use, 0..1.")
PREFIX_QUERIES = MetricSpec("prefix_cache_queries", Kind.COUNTER, "Prompt tokens looked up in the prefix cache "
                            "(counted per finished request).")  # fmt: skip
PREFIX_HITS = MetricSpec("prefix_cache_hits", Kind.COUNTER, "Prompt tokens served from the prefix cache.")
PREEMPTIONS = MetricSpec("num_preemptions", Kind.COUNTER, "Preemptions of requests (KV blocks taken back).")
PROMPT_TOKENS = MetricSpec("prompt_tokens", Kind.COUNTER, "Prompt tokens of finished requests.", TENANT_LABELS)
GENERATION_TOKENS = MetricSpec("generation_tokens", Kind.COUNTER, "Tokens generated for finished requests.",
                               TENANT_LABELS)
SUCCESS = MetricSpec("request_success", Kind.COUNTER, "Finished requests, by finish reason.",
                     (MODEL, REPLICA, TENANT, FINISHED_REASON))
COST = MetricSpec("cost_usd", Kind.COUNTER, "Cost of finished requests in US dollars (measured step time x "
                  "devices x price, split by tokens).", TENANT_LABELS)  # fmt: skip

# Counters fed from a finished request's RequestMetrics: spec -> attribute. New engine counters
# (e.g. speculative decoding's accepted / drafted tokens) are one line here plus their spec.
ENGINE_COUNTERS: dict[MetricSpec, str] = {
    PREFIX_QUERIES: "num_prompt_tokens",
    PREFIX_HITS: "num_cached_prompt_tokens",
    PREEMPTIONS: "num_preemptions",
}

# Counters fed from the engine's totals since start (EngineStats): spec -> the total, or None when
# the engine does not have it. The replica adds what grew since the last sample.
SPEC_DRAFTS = MetricSpec("spec_decode_num_drafts", Kind.COUNTER, "Speculative decoding: drafts verified (a "
                         "request given one or more draft tokens in a step).")  # fmt: skip
SPEC_DRAFT_TOKENS = MetricSpec("spec_decode_num_draft_tokens", Kind.COUNTER, "Draft tokens proposed.")
SPEC_ACCEPTED = MetricSpec("spec_decode_num_accepted_tokens", Kind.COUNTER, "Draft tokens accepted.")
# Accepted drafts per draft position, from EngineStats.spec_decode.accepted_per_position.
SPEC_ACCEPTED_PER_POS = MetricSpec("spec_decode_num_accepted_tokens_per_pos", Kind.COUNTER, "Draft tokens "
                                   "accepted at each position of their draft (0 = first).",
                                   (MODEL, REPLICA, POSITION))  # fmt: skip
ENGINE_TOTALS: dict[MetricSpec, Callable[[EngineStats], float | None]] = {
    SPEC_DRAFTS: lambda s: s.spec_decode.num_drafts if s.spec_decode else None,
    SPEC_DRAFT_TOKENS: lambda s: s.spec_decode.num_draft_tokens if s.spec_decode else None,
    SPEC_ACCEPTED: lambda s: s.spec_decode.num_accepted_tokens if s.spec_decode else None,
}

SPECS: tuple[MetricSpec, ...] = (
    TTFT, ITL, E2E, QUEUE_TIME, STEP_TIME, BATCH_SIZE, COLD_START, STARTUP, RUNNING, WAITING, KV_USAGE,
    PROMPT_TOKENS, GENERATION_TOKENS, SUCCESS, COST, *ENGINE_COUNTERS, *ENGINE_TOTALS, SPEC_ACCEPTED_PER_POS,
)  # fmt: skip

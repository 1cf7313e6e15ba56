"""Figures of one load point on one endpoint, from its request records.

Data flow: `summarize(result, slo)` reads the `RequestRecord`s of a `PointResult` and returns a
`PointSummary`: percentiles (p50, p90, p99 and the mean, in ms) of TTFT, of the inter-token
latencies of every token after the first (ITL), of each request's mean time per output token
(TPOT) and of e2e latency, over the requests that succeeded; request and token throughput over the
point's duration; and goodput — requests per second that succeeded AND met the SLO: TTFT <=
slo_ttft_ms and the request's own mean inter-token latency (its TPOT) <= slo_itl_ms (a request of
one token has no inter-token latency and meets that half). A request that failed counts as an
error and never as good. Goodput <= request throughput by construction.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from shardserve.cluster.bench_serve.records import PointResult

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class Slo:
    ttft_ms: float | None = None
    itl_ms: float | None = None

    def met(self, ttft_s: float, tpot_s: float | None) -> bool:
        if self.ttft_ms is not None and ttft_s * 1e3 > self.ttft_ms:
            return False
        return self.itl_ms is None or tpot_s is None or tpot_s * 1e3 <= self.itl_ms


@dataclass(frozen=True)
class Stats:
    """Milliseconds; None when there were no samples."""

    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None

    @staticmethod
    def of(seconds: list[float]) -> Stats:
        if not seconds:
            return Stats(None, None, None, None)
        ms = np.asarray(seconds) * 1e3
        p50, p90, p99 = (float(np.percentile(ms, q)) for q in PERCENTILES)
        return Stats(float(ms.mean()), p50, p90, p99)


@dataclass(frozen=True)
class PointSummary:
    endpoint: str
    load: str
    load_kind: str
    load_value: float
    num_requests: int
    num_ok: int
    num_errors: int
    duration_s: float
    input_tokens: int
    output_tokens: int
    request_throughput: float  # successful requests / s
    output_throughput: float  # output tokens / s
    total_token_throughput: float  # (prompt + output) tokens / s
    goodput: float  # successful requests meeting the SLO / s
    num_good: int
    num_short: int  # succeeded with fewer tokens than asked (ignore_eos not honoured, or the context ended)
    ttft_ms: Stats
    itl_ms: Stats
    tpot_ms: Stats
    e2e_ms: Stats
    errors: list[str]

    def to_json(self) -> dict:
        return asdict(self)


def summarize(result: PointResult, slo: Slo) -> PointSummary:
    ok = [r for r in result.records if r.ok]
    failed = [r for r in result.records if not r.ok]
    duration = max(result.duration_s, 1e-9)
    input_tokens = sum(r.prompt_tokens if r.prompt_tokens is not None else (r.input_len or 0) for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    num_good = sum(slo.met(r.ttft_s, r.tpot_s) for r in ok)
    tpots = [t for r in ok if (t := r.tpot_s) is not None]
    return PointSummary(
        endpoint=result.endpoint, load=result.point.label, load_kind=result.point.kind,
        load_value=result.point.value, num_requests=len(result.records), num_ok=len(ok), num_errors=len(failed),
        duration_s=result.duration_s, input_tokens=input_tokens, output_tokens=output_tokens,
        request_throughput=len(ok) / duration, output_throughput=output_tokens / duration,
        total_token_throughput=(input_tokens + output_tokens) / duration,
        goodput=num_good / duration, num_good=num_good, num_short=sum(r.output_tokens < r.max_tokens for r in ok),
        ttft_ms=Stats.of([r.ttft_s for r in ok]), itl_ms=Stats.of([x for r in ok for x in r.itl_s()]),
        tpot_ms=Stats.of(tpots), e2e_ms=Stats.of([r.e2e_s for r in ok]),
        errors=sorted({r.error or "no output" for r in failed}),
    )

"""Fuzzing in CI (issue 20 item 4): schemathesis cases from the served OpenAPI document over real
HTTP and hypothesis-drawn gRPC messages (some corrupted), 2,200 in all against the fake-engine
model `fake`, with good HTTP and gRPC requests running beside them. Invariants (benchmarks/fuzz.py):
no 5xx / no gRPC status outside the client errors, every HTTP 4xx in OpenAI's error shape, status
codes the OpenAPI document lists, every good request completed, LLMServer replica ids unchanged.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import fuzz  # noqa: E402

pytestmark = pytest.mark.slow

NUM_CASES = 2200


def test_fuzzed_requests_never_break_the_service(cluster):
    report = fuzz.run(cluster.http_url, cluster.grpc_target, NUM_CASES, model="fake", concurrency=8, seed=20)
    print(json.dumps(report.summary(), indent=2))
    assert report.cases >= 2000
    assert not report.problems(), report.problems()[:10]
    # The fuzz reached both front ends and both outcomes (served and refused).
    statuses = report.statuses
    assert statuses["http:200"] > 0 and statuses["http:400"] > 0, statuses
    assert statuses["grpc:OK"] > 0 and statuses["grpc:INVALID_ARGUMENT"] > 0, statuses
    assert report.good_sent >= 2 and len(report.replicas_before) == 2, report.summary()

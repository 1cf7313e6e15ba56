"""A short soak in CI: benchmarks/soak.py (the 10,000-request script) with a few hundred requests
against the real-engine app, run as a user runs it, in a subprocess (issue 20, item 6).

Mixed traffic — streaming, n = 2, early closes, abandoned requests, bad HTTP and gRPC requests —
must lose nothing, leave no request running or waiting and no KV block held by the app's own
counters, and restart no replica.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from real_app import MODEL, ROUTE_PREFIX

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"
NUM_REQUESTS = 300


def test_short_soak_loses_and_leaks_nothing(real):
    cmd = [sys.executable, str(SCRIPT), "--url", real.http_url, "--route-prefix", ROUTE_PREFIX,
           "--grpc", real.grpc_target, "--model", MODEL, "--requests", str(NUM_REQUESTS),
           "--concurrency", "24", "--max-tokens", "8", "--seed", "20"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.stdout.strip(), proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["lost"] == 0, summary["first_lost"]
    assert summary["leaked"] == 0, summary["leaked_replicas"]
    assert summary["restarts"] == 0, summary
    outcomes = summary["outcomes"]
    assert outcomes["good"] >= NUM_REQUESTS * 0.5 and outcomes["bad"] >= NUM_REQUESTS * 0.15, outcomes
    assert outcomes["cancel"] > 0, outcomes
    assert proc.returncode == 0, proc.stderr[-3000:]

"""Bursts and impatient clients against the real engine, through the served app (issue 20).

benchmarks/burst.py, run as a user runs it (a subprocess), against the real-engine app
(tests/cluster/real_app.py: SmolLM2 on CPU, 8 running and 16 waiting samples at most): 300
concurrent requests over HTTP, then over gRPC, half of the clients giving up after 0.2 s. The
script checks the invariants — only 200 / OK and 429 / RESOURCE_EXHAUSTED (429s in OpenAI's error
shape with Retry-After), the same replica before and after (no restart), the engine idle with no KV
block held, the next request answered at once — and this test checks that the queue really filled
and requests were really served. n counts against the queue: n above the bound is a 400 naming n.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from real_app import MODEL, ROUTE_PREFIX

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "burst.py"


def test_burst_with_abandoning_clients(real):
    cmd = [sys.executable, str(SCRIPT), "--url", real.http_url + ROUTE_PREFIX, "--grpc", real.grpc_target,
           "--model", MODEL, "--requests", "300", "--abandon-s", "0.2", "--next-request-s", "20"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.stdout.strip(), proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    for protocol, ok, full in (("http", "200", "429"), ("grpc", "OK", "RESOURCE_EXHAUSTED")):
        result = summary[protocol]
        assert all(result["checks"].values()), result
        assert result["outcomes"].get(ok, 0) > 0 and result["outcomes"].get(full, 0) > 0, result
    assert summary["ok"] and proc.returncode == 0, summary


def test_n_counts_against_the_queue(real):
    url = real.http_url + ROUTE_PREFIX + "/v1/completions"
    resp = httpx.post(url, json={"model": MODEL, "prompt": "Hi", "max_tokens": 2, "n": 17}, timeout=60)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == "n" and "max_queue_len = 16" in error["message"], error
    resp = httpx.post(url, json={"model": MODEL, "prompt": "Hi", "max_tokens": 2, "n": 16}, timeout=120)
    assert resp.status_code == 200 and len(resp.json()["choices"]) == 16, resp.text

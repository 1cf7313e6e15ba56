"""`shardserve bench latency|throughput --price-per-hour`: cost per million output tokens from the requests'
measured costs (workers/cost.py) beside tokens/s; throughput's requests add up to busy time x price and
stay within the aggregate (elapsed x price); a negative price exits 2 naming the flag and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from shardserve.cluster.cli import main

MODEL = ["--model", "dummy:tiny-llama", "--device", "cpu", "--dtype", "float32", "--no-hf"]


def _bench(tmp_path: Path, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[dict, str]:
    out = tmp_path / "bench.json"
    assert main(["bench", *argv, *MODEL, "--json", str(out)]) == 0
    return json.loads(out.read_text()), capsys.readouterr().out


def test_throughput_prints_measured_cost_that_adds_up(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result, out = _bench(tmp_path, capsys, "throughput", "--num-requests", "6", "--input-len", "16",
                         "--output-len", "8", "--price-per-hour", "3.0")
    ours = result["ours"]
    assert ours["cost_usd"] == pytest.approx(result["busy_cost_usd"], rel=1e-9)
    measured, aggregate = result["measured_cost_per_million_output_tokens"], result["cost_per_million_output_tokens"]
    assert measured == pytest.approx(ours["cost_usd"] / ours["output_tokens"] * 1e6)
    assert 0.5 * aggregate < measured <= aggregate * (1 + 1e-9)  # busy time lies within the elapsed time
    assert f"${measured:.3f} per 1M output tokens; the 6 requests' costs" in out and "100.00% of busy time" in out


def test_latency_prints_cost_only_with_a_price(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    priced, out = _bench(tmp_path, capsys, "latency", "--batch-sizes", "1,2", "--input-len", "8", "--output-len", "6",
                         "--price-per-hour", "3.0")
    rows = priced["results"]
    assert all(r["cost_usd"] > 0 and r["measured_cost_per_million_output_tokens"] > 0 for r in rows)
    assert [line.endswith(" $/1M") for line in out.splitlines()[2:4]] == [True, True] and "$/1M: measured" in out
    plain, out = _bench(tmp_path, capsys, "latency", "--batch-sizes", "1", "--input-len", "8", "--output-len", "6")
    assert plain["results"][0]["cost_usd"] is None and "$/1M" not in out


def test_negative_price_exits_2_naming_flag_and_field(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "throughput", *MODEL, "--price-per-hour", "-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("shardserve bench throughput: --price-per-hour: cpu_hour_usd must be >= 0"), err

"""The pipeline-analysis tools: benchmarks/pp_window_trace.py's trace arithmetic (busy, NCCL-only
and idle shares of a rank's window, largest gaps) on a synthetic Chrome trace, and
benchmarks/driver_overhead.py's engine with the instant executor finishing a real workload
with every token accounted for, under PP micro-batches and without."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import driver_overhead  # noqa: E402
import pp_window_trace as pwt  # noqa: E402


def _kernel(name: str, ts: float, dur: float) -> dict:
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur}


def test_interval_arithmetic() -> None:
    assert pwt.union([(5, 7), (0, 2), (1, 3), (7, 8)]) == [(0, 3), (5, 8)]
    assert pwt.subtract([(0, 10)], [(2, 3), (5, 6)]) == [(0, 2), (3, 5), (6, 10)]
    assert pwt.subtract([(0, 4), (6, 9)], [(3, 7)]) == [(0, 3), (7, 9)]
    assert pwt.subtract([(0, 4)], []) == [(0, 4)]
    assert pwt.length([(0, 3), (5, 8)]) == 6


def test_trace_shares_and_gaps(tmp_path: Path) -> None:
    # window 0..1000 us: compute 0-300 and 700-1000 (600), a recv 250-500 of which 250-300
    # overlaps compute (NCCL-only 200), idle 500-700 (200); a CPU op is ignored
    events = [_kernel("gemm", 0, 300), _kernel("ncclDevKernel_SendRecv", 250, 250), _kernel("attn", 700, 300),
              {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 5000}]
    path = tmp_path / "rank1.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    result = pwt.analyse_trace(str(path))
    assert result["kernels"] == 3 and result["window_ms"] == pytest.approx(1.0)
    assert result["compute_busy"] == pytest.approx(0.6)
    assert result["nccl_only"] == pytest.approx(0.2)
    assert result["idle"] == pytest.approx(0.2)
    [gap] = result["gaps"]
    assert gap["us"] == pytest.approx(200) and gap["at_ms"] == pytest.approx(0.5)
    assert gap["after"] == "ncclDevKernel_SendRecv" and gap["before"] == "attn"


@pytest.mark.parametrize(("pp", "micro_batches"), [(1, None), (2, 3)])
def test_instant_executor_runs_the_real_engine_loop(pp: int, micro_batches: int | None) -> None:
    args = driver_overhead.parse_args(["--model", "dummy:tiny-llama", "--num-requests", "40", "--input-len", "30",
                                       "--output-len", "9", "--max-num-seqs", "24", "--pp", str(pp),
                                       *(["--micro-batches", str(micro_batches)] if micro_batches else [])])
    engine = driver_overhead.build_engine(args)
    assert isinstance(engine.executor, driver_overhead.InstantExecutor)
    assert engine.max_batches_in_flight == (micro_batches or 2)  # P = 1: async scheduling, 2 in flight
    result = driver_overhead.measure(engine, args)
    assert result.num_finished == 40 and result.output_tokens == 40 * 9
    assert result.engine_steps > 9 and result.seconds > 0


def test_script_prints_the_cap() -> None:
    proc = subprocess.run([sys.executable, str(BENCH / "driver_overhead.py"), "--model", "dummy:tiny-llama",
                           "--num-requests", "16", "--max-num-seqs", "8", "--output-len", "5", "--profile"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "output tok/s" in proc.stdout and "tottime" in proc.stdout

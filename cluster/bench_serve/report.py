"""What a run prints and writes: a block per load point and endpoint, a side-by-side table, the JSON.

Data flow: cli.py calls `print_point` as each load point ends on an endpoint (progress you can
read while a long run goes on), `print_table` at the end (every endpoint and load, one line each),
`print_goodput_side_by_side` (with several endpoints: goodput per load, and the ratios), and `write_json` with the summaries and every raw request record. JSON has no infinity, so a rate
of `inf` is written as the string "inf".
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from shardserve.cluster.bench_serve.records import PointResult
from shardserve.cluster.bench_serve.summary import PointSummary, Slo


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _slo_text(slo: Slo) -> str:
    parts = [f"TTFT <= {slo.ttft_ms:g} ms" if slo.ttft_ms is not None else "",
             f"ITL <= {slo.itl_ms:g} ms" if slo.itl_ms is not None else ""]
    return ", ".join(p for p in parts if p) or "no SLO set: every successful request"


def print_point(s: PointSummary, slo: Slo) -> None:
    print(f"== {s.endpoint} @ {s.load}: {s.num_ok} ok, {s.num_errors} errors in {s.duration_s:.2f} s")
    print(f"   {s.request_throughput:.2f} req/s, {s.output_throughput:.1f} output tok/s, "
          f"{s.total_token_throughput:.1f} total tok/s; goodput {s.goodput:.2f} req/s ({_slo_text(slo)})")
    print(f"   {'ms':<5} {'mean':>9} {'p50':>9} {'p90':>9} {'p99':>9}")
    for name, stats in (("TTFT", s.ttft_ms), ("ITL", s.itl_ms), ("TPOT", s.tpot_ms), ("E2E", s.e2e_ms)):
        print(f"   {name:<5} {_ms(stats.mean):>9} {_ms(stats.p50):>9} {_ms(stats.p90):>9} {_ms(stats.p99):>9}")
    if s.num_short:
        print(f"   {s.num_short} requests got fewer tokens than asked (an end-of-sequence token with "
              "--no-ignore-eos, a server that ignores ignore_eos / min_tokens, or the context's end)")
    for error in s.errors[:5]:
        print(f"   error: {error}")


def print_table(summaries: list[PointSummary], slo: Slo) -> None:
    print(f"\ngoodput: {_slo_text(slo)}; latencies in ms")
    head = (f"{'load':<12} {'endpoint':<14} {'ok':>5} {'err':>4} {'req/s':>7} {'good/s':>7} {'out tok/s':>9} "
            f"{'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} {'E2E p50':>9} {'E2E p99':>9}")
    print(head)
    for s in summaries:
        print(f"{s.load:<12} {s.endpoint:<14} {s.num_ok:>5} {s.num_errors:>4} {s.request_throughput:>7.2f} "
              f"{s.goodput:>7.2f} {s.output_throughput:>9.1f} {_ms(s.ttft_ms.p50):>9} {_ms(s.ttft_ms.p99):>9} "
              f"{_ms(s.itl_ms.p50):>8} {_ms(s.itl_ms.p99):>8} {_ms(s.e2e_ms.p50):>9} {_ms(s.e2e_ms.p99):>9}")


def print_goodput_side_by_side(summaries: list[PointSummary]) -> None:
    """With several endpoints: each load's goodput per endpoint, and the first endpoint's over each other's."""
    endpoints = list(dict.fromkeys(s.endpoint for s in summaries))
    if len(endpoints) < 2:
        return
    first, others = endpoints[0], endpoints[1:]
    print(f"\ngoodput side by side (req/s meeting the SLO); ratio = {first} / other")
    print(f"{'load':<12} " + " ".join(f"{e:>12}" for e in endpoints) + " " + " ".join(
        f"{first + '/' + e:>16}" for e in others))
    for load in dict.fromkeys(s.load for s in summaries):
        row = {s.endpoint: s.goodput for s in summaries if s.load == load}
        ratios = [f"{row[first] / row[e]:.2f}x" if row.get(e) and first in row else "-" for e in others]
        print(f"{load:<12} " + " ".join(f"{row[e]:>12.2f}" if e in row else f"{'-':>12}" for e in endpoints) + " "
              + " ".join(f"{r:>16}" for r in ratios))


def _finite(value: float) -> float | str:
    return "inf" if math.isinf(value) else value


def write_json(path: Path, config: dict[str, Any], summaries: list[PointSummary], results: list[PointResult]) -> None:
    points = []
    for summary, result in zip(summaries, results, strict=True):
        data = summary.to_json()
        data["load_value"] = _finite(summary.load_value)
        points.append({"summary": data, "requests": [r.to_json() for r in result.records]})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"config": config, "points": points}, indent=1, allow_nan=False))

"""Runs `shardserve bench serve` from parsed flags: dataset, load, print, JSON, plots.

Data flow: options.to_options(args) -> dataset.build_requests -> runner.run_all (asyncio, one
endpoint at a time per load point, fresh prompts each; each point printed as it ends) -> summary.summarize ->
report.print_table / write_json (also after each point) -> plots.write_plots (imported here, only when plots are on).
Returns the exit code: 0; 2 for flags that contradict each other or a dataset that cannot be read
(the message names the flag, or the file and line); 1 when not one request succeeded. Errors of
single requests do not fail the run: they are counted, printed and kept in the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
from dataclasses import asdict
from pathlib import Path

from shardserve.cluster.bench_serve.dataset import DatasetError, build_requests, fresh_prompts
from shardserve.cluster.bench_serve.options import ServeBenchOptions, UsageError, to_options
from shardserve.cluster.bench_serve.records import PointResult
from shardserve.cluster.bench_serve.summary import PointSummary, summarize


def _config_json(options: ServeBenchOptions) -> dict:
    return {
        "endpoints": [asdict(e) for e in options.endpoints],
        "load_points": [{"kind": p.kind, "value": "inf" if math.isinf(p.value) else p.value} for p in options.points],
        "schedule": asdict(options.schedule), "dataset": asdict(options.dataset),
        "client": {**asdict(options.client), "api_key": None}, "slo": asdict(options.slo),
        "num_warmup": options.num_warmup,
    }


def run(args: argparse.Namespace) -> int:
    try:
        options = to_options(args)
        requests = build_requests(options.dataset)
    except (UsageError, DatasetError) as exc:
        print(f"shardserve bench serve: error: {exc}", file=sys.stderr)
        return 2
    from shardserve.cluster.bench_serve import report
    from shardserve.cluster.bench_serve.runner import run_all

    summaries: list[PointSummary] = []
    done: list[PointResult] = []
    out_dir = Path(options.out_dir)

    def on_result(result: PointResult) -> None:
        summaries.append(summarize(result, options.slo))
        done.append(result)
        report.print_point(summaries[-1], options.slo)
        sys.stdout.flush()
        report.write_json(out_dir / "results.json", _config_json(options), summaries, done)  # kept if the run is cut

    def requests_for(salt: int):
        return fresh_prompts(requests, options.dataset, salt)

    results = asyncio.run(run_all(options.endpoints, options.points, requests_for, options.client,
                                  options.schedule, on_result, options.num_warmup))
    report.print_table(summaries, options.slo)
    report.print_goodput_side_by_side(summaries)
    report.write_json(out_dir / "results.json", _config_json(options), summaries, results)
    written = [out_dir / "results.json"]
    if options.plots:
        from shardserve.cluster.bench_serve.plots import write_plots

        written += write_plots(summaries, results, options.slo, out_dir)
    print("wrote " + ", ".join(str(p) for p in written))
    if not any(s.num_ok for s in summaries):
        print("shardserve bench serve: no request succeeded (errors above)", file=sys.stderr)
        return 1
    return 0

"""`shardserve bench latency|throughput`: our engine beside transformers, same process.

Prints the device, our figure, the transformers `generate` figure on the same prompts, and
the ratio; latency also prints achieved bandwidth against the copy bandwidth measured in the
same run. The heavy lifting is in workers/bench/ (this module only parses flags and prints).
"""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="latency / throughput benchmarks against transformers")
    sub = p.add_subparsers(dest="bench_kind", required=True)
    for kind in ("latency", "throughput"):
        q = sub.add_parser(kind)
        q.add_argument("--model", default="default")
        q.add_argument("--dtype", default="auto")
        q.add_argument("--device", default="auto")
        q.add_argument("--input-len", type=int, default=128 if kind == "throughput" else 16)
        q.add_argument("--output-len", type=int, default=128)
        q.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
        q.add_argument("--json", default=None, help="also write the results to this JSON file")
        q.add_argument("--max-num-seqs", type=int, default=256)
        q.add_argument("--max-num-batched-tokens", type=int, default=2048)
        q.add_argument("--mode", default="continuous", choices=["continuous", "static"])
        q.add_argument("--min-admit-batch", type=int, default=1, help="admit waiting requests in bursts of this many")
        if kind == "latency":
            q.add_argument("--batch-sizes", default="1", help="comma-separated, e.g. 1,8,32")
        else:
            q.add_argument("--num-requests", type=int, default=64)
            q.add_argument("--distribution", default="fixed", choices=["fixed", "lognormal"])
            q.add_argument("--sigma", type=float, default=0.8)
            q.add_argument("--seed", type=int, default=0)
            q.add_argument("--hf-batch-size", type=int, default=16)
            q.add_argument("--hf-num-requests", type=int, default=None,
                           help="run transformers on the first N requests only (it is slow); tokens/s compares")
            q.add_argument("--price-per-hour", type=float, default=2.5, help="device price for cost per token")
        q.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from shardserve.workers.bench.cli_runs import run_latency_bench, run_throughput_bench

    result = run_latency_bench(args) if args.bench_kind == "latency" else run_throughput_bench(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    sys.stdout.flush()
    return 0

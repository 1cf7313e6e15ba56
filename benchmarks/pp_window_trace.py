"""Where pipeline stages wait under the real throughput workload: a profiled window of steady decode.

Why: PP 2 with 3 micro-batches stayed well below what the stages' compute would allow
(benchmarks/README.md); neither rebalancing the layers nor a 4th micro-batch helped. The
single-batch profile (`profile_tp.py --pp 2`) cannot show a pipeline's stalls, so this script
runs parallel_gpu.py's `ppmb` workload (3,072 requests, 200 in / 180 out, 1,536 running in 3
micro-batches), lets it reach steady decode, then profiles `--steps` engine steps on both ranks
(benchmarks/kernel_profile.py; Chrome traces with SHARDSERVE_PROFILE_TRACE_DIR) and stops.

Printed per rank, over its profiled window (first kernel start to last kernel end):
  compute busy  union of the non-NCCL kernels / window
  nccl only     NCCL kernels (send/recv) not overlapped by compute: a stage waiting for its peer
  idle          nothing running
and each rank's largest idle gaps with the kernels on either side. Driver side, over the same
steps: wall per engine step, time blocked in `executor.collect` (waiting for the last stage)
and in `executor.submit` (pickling + pipe writes), and the rest (scheduler + outputs). A driver
that is rarely blocked in collect is the bound, not the stages.

`--warm-steps` picks the phase: the default 150 lands in steady decode of the first wave; a
small value (e.g. 5) profiles the first prefill wave instead.

Run (2 GPUs):  PYTHONPATH=/tmp/ns SHARDSERVE_PROFILE_TRACE_DIR=$OUT/trace python3 benchmarks/pp_window_trace.py
CPU smoke:     python benchmarks/pp_window_trace.py --device cpu --model dummy:tiny-llama --num-requests 24 \
                   --max-num-seqs 12 --warm-steps 10 --steps 6
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import sys
import time
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # parallel_gpu.py sits beside this script
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernel_profile import ENV_TRACE_DIR, profile_ranks  # noqa: E402
from parallel_gpu import _engine  # noqa: E402
from shardserve.workers.bench.workload import Workload  # noqa: E402
from shardserve.workers.request import SamplingParams  # noqa: E402

NCCL = re.compile(r"nccl", re.IGNORECASE)


class TimedExecutor:
    """Wraps the engine's executor: seconds spent in submit and in collect (driver side)."""

    def __init__(self, inner) -> None:
        self.inner, self.submit_s, self.collect_s = inner, 0.0, 0.0

    def submit(self, sched):
        start = time.perf_counter()
        try:
            return self.inner.submit(sched)
        finally:
            self.submit_s += time.perf_counter() - start

    def collect(self, handle):
        start = time.perf_counter()
        try:
            return self.inner.collect(handle)
        finally:
            self.collect_s += time.perf_counter() - start

    def __getattr__(self, name):  # execute, call, check_health, shutdown, num_blocks, ...
        return getattr(self.inner, name)


def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def length(intervals: list[tuple[float, float]]) -> float:
    return sum(end - start for start, end in intervals)


def subtract(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """a minus b; both sorted, disjoint."""
    out, j = [], 0
    for start, end in a:
        cur = start
        while j < len(b) and b[j][1] <= cur:
            j += 1
        k = j
        while k < len(b) and b[k][0] < end:
            if b[k][0] > cur:
                out.append((cur, b[k][0]))
            cur = max(cur, b[k][1])
            k += 1
        if cur < end:
            out.append((cur, end))
    return out


def analyse_trace(path: str, top: int = 6) -> dict:
    """Busy / NCCL-only / idle shares of one rank's Chrome trace window, and its largest idle gaps."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    kernels = [(e["ts"], e["ts"] + e.get("dur", 0), e["name"]) for e in events
               if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not kernels:
        return {"trace": os.path.basename(path), "kernels": 0}
    kernels.sort()
    window = (kernels[0][0], max(k[1] for k in kernels))
    span = window[1] - window[0]
    compute = union([(s, e) for s, e, n in kernels if not NCCL.search(n)])
    nccl_only = subtract(union([(s, e) for s, e, n in kernels if NCCL.search(n)]), compute)
    busy = union(compute + nccl_only)
    gaps = [(busy[i][1], busy[i + 1][0]) for i in range(len(busy) - 1)]
    gaps.sort(key=lambda g: g[0] - g[1])

    def around(t: float) -> tuple[str, str]:
        before = max((k for k in kernels if k[1] <= t + 0.01), key=lambda k: k[1], default=None)
        after = min((k for k in kernels if k[0] >= t - 0.01), key=lambda k: k[0], default=None)
        return (before[2][:60] if before else "-"), (after[2][:60] if after else "-")

    return {"trace": os.path.basename(path), "kernels": len(kernels), "window_ms": span / 1e3,
            "compute_busy": length(compute) / span, "nccl_only": length(nccl_only) / span,
            "idle": 1 - length(busy) / span,
            "gaps": [{"at_ms": (g[0] - window[0]) / 1e3, "us": g[1] - g[0], "after": around(g[0])[0],
                      "before": around(g[1])[1]} for g in gaps[:top]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dummy:llama-3.1-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--num-requests", type=int, default=3072)
    parser.add_argument("--max-num-seqs", type=int, default=1536)
    parser.add_argument("--micro-batches", type=int, default=3)
    parser.add_argument("--warm-steps", type=int, default=150, help="engine steps before the window (prefill done)")
    parser.add_argument("--steps", type=int, default=30, help="engine steps profiled")
    args = parser.parse_args()

    case = dict(kind="throughput", model=args.model, tp=1, pp=2, ep=1, max_num_seqs=args.max_num_seqs,
                pipeline_micro_batches=args.micro_batches)
    engine = _engine(case, args.device, args.num_requests)
    try:
        engine.executor = engine.batches.executor = timed = TimedExecutor(engine.executor)  # every step through it
        vocab = engine.loaded.hf_config.vocab_size
        for i, r in enumerate(Workload(args.num_requests, 200, 180).sample(vocab)):
            engine.add_request(f"w-{i}", r.prompt_token_ids,
                               SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True, final_only=True))
        for _ in range(args.warm_steps - 2):
            engine.step()
        # The first profiler session on a rank pays CUPTI's start-up (~0.24 s stall on 2 H100s,
        # the first window's largest "gap"): spend it on two steps outside the window (their
        # traces, if any, are overwritten by the window's).
        profile_ranks(engine, lambda: [engine.step() for _ in range(2)])
        timed.submit_s = timed.collect_s = 0.0
        walls: list[float] = []

        def run() -> None:
            for _ in range(args.steps):
                start = time.perf_counter()
                engine.step()
                walls.append(time.perf_counter() - start)

        profile_ranks(engine, run)
        total = sum(walls)
        print(f"{args.model} PP 2 x {args.micro_batches} micro-batches, {len(engine.scheduler.running)} running; "
              f"window of {args.steps} engine steps after {args.warm_steps}")
        print(f"driver: {total / args.steps * 1e3:.2f} ms per engine step; blocked in collect "
              f"{timed.collect_s / total:.0%}, in submit {timed.submit_s / total:.0%}, "
              f"scheduler + outputs {(total - timed.collect_s - timed.submit_s) / total:.0%}")
        trace_dir = os.environ.get(ENV_TRACE_DIR)
        if trace_dir:
            for name in sorted(os.listdir(trace_dir)):
                if name.endswith(".json"):
                    result = analyse_trace(os.path.join(trace_dir, name))
                    print(json.dumps({k: v for k, v in result.items() if k != "gaps"},
                                     default=lambda v: round(v, 3)))
                    for gap in result.get("gaps", []):
                        print(f"   gap {gap['us']:8.1f} us at {gap['at_ms']:7.2f} ms: {gap['after']} -> {gap['before']}")
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()

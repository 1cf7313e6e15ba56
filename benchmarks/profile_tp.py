"""Kernel-time profile of tensor-parallel engine steps, rank by rank: profile_gpu.py for TP > 1.

The engine runs with ParallelConfig(tensor_parallel_size=--tp, pipeline_parallel_size=--pp,
expert_parallel_size=--ep): the model lives in one worker process per rank (MultiprocExecutor),
so the profiler runs there. Data flow: this process drives the engine; around the profiled steps
it makes the Worker calls `probe_start` / `probe_stop` (a KernelProfileProbe) on every rank
(`profile_ranks` in benchmarks/kernel_profile.py); each rank runs torch.profiler over the
steps it executes and sends back its kernels by name and time; they are summarised here per rank
with profile_gpu's category rules (CATEGORY_RULES in kernel_profile.py).

Each case builds its batch through the engine API as profile_gpu.py does (its CaseDriver): the
requests are queued and stepped until every one decodes, then `--warmup` steps, `--timed` steps
timed without the profiler (engine.step() wall, median), and `--steps` steps profiled on every
rank. Default cases (dense and MoE alike):
  b1        one request decoding at ~150 tokens of context (CUDA graphs as served)
  decode64  64 requests decoding at ~400 tokens of context
`--cases` may also name profile_gpu's other cases with CUDA graphs on (decode400, mixed, ...);
`--small` scales every case down for the CPU smoke test.

Per case (printed, and in `<out>/profile_tp.json`): step wall (median, unprofiled and
profiled), per rank the device kernel time and kernel count per step (async scheduling: one
batch per step) and its category split, the maximum over ranks per category (the slowest rank
bounds a TP step: all-reduces wait for it), and rank 0's top 15 kernels. Differences from
profile_gpu.py: the sampler split is not available (kernels launched inside the sampler are not
told apart across processes: every kernel is categorised by its name only, so the sampler's
elementwise kernels count as "other"); no GPU-event time, decode floor or eager (graphs off)
case; no `--num-layers` (the shape it registers lives in this process only, the spawned ranks
would not know it). On CPU the "kernels" are the aten ops with their self CPU time, the
all-reduces gloo's c10d ops.

Run on a 2-GPU machine, from the repo root (the working tree imported as `shardserve.*` without
installing it):
    mkdir -p /tmp/ns/shardserve && for d in cluster workers parallel; do
        ln -sfn "$PWD/$d" /tmp/ns/shardserve/$d; done
    PYTHONPATH=/tmp/ns python3 benchmarks/profile_tp.py --tp 2 --out "$OUT"
    PYTHONPATH=/tmp/ns python3 benchmarks/profile_tp.py --tp 2 --out "$OUT/moe" --model dummy:qwen3-30b-a3b --cases b1
CPU smoke: `python benchmarks/profile_tp.py --device cpu --tp 2 --model dummy:tiny-llama --out /tmp/p --small`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # profile_gpu.py sits beside this script
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from kernel_profile import (  # noqa: E402
    CATEGORIES,
    CATEGORY_RULES,
    MOE_ROUTING,
    RankProfile,
    profile_ranks,
    summarize,
)
from profile_gpu import (  # noqa: E402
    SHORT,
    Case,
    CaseDriver,
    add_case_args,
    check_case_args,
    default_cases,
    engine_config,
    is_moe_model,
    print_top_kernels,
    run_cases,
    select_cases,
)
from shardserve.workers.config import ParallelConfig  # noqa: E402
from shardserve.workers.engine import LLMEngine  # noqa: E402


def tp_cases(is_moe: bool, small: bool) -> tuple[list[Case], list[Case]]:
    """(default cases, every case `--cases` may name): b1 and decode64, then profile_gpu's cases
    that run with CUDA graphs (their graphs flag cannot be set on the ranks)."""
    own = [Case("b1", 1, 24), Case("decode64", 4, 40)] if small else [Case("b1", 1, 150), Case("decode64", 64, 400)]
    names = {c.name for c in own}
    return own, own + [c for c in default_cases(is_moe, small) if c.graphs and c.name not in names]


def build_engine(args: argparse.Namespace) -> LLMEngine:
    parallel = ParallelConfig(tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp,
                              expert_parallel_size=args.ep)
    return LLMEngine(replace(engine_config(args, args.model), parallel=parallel))


def rank_summary(profile: RankProfile, steps: int, is_moe: bool) -> dict:
    return {"rank": profile.rank, "tp_rank": profile.tp_rank, "pp_rank": profile.pp_rank, "ep_rank": profile.ep_rank,
            "device": profile.device, **summarize(profile.as_kernels(), steps, is_moe)}


def run_case(engine: LLMEngine, case: Case, args: argparse.Namespace, is_moe: bool) -> dict:
    driver = CaseDriver(engine, case, args.warmup + args.timed + args.steps // 2 + 2)
    preemptions = engine.stats().num_preemptions
    walls: list[float] = []
    try:
        driver.wait_until_decoding()
        for _ in range(args.warmup):
            driver.step()
        unprofiled = [driver.step() for _ in range(args.timed)]
        context = driver.mean_context()
        collected = engine.executor.num_steps
        profiles = profile_ranks(engine, lambda: walls.extend(driver.step() for _ in range(args.steps)))
        collected = engine.executor.num_steps - collected
        context = (context + driver.mean_context()) / 2
    finally:
        driver.drain()
    ranks = [rank_summary(p, args.steps, is_moe) for p in profiles]
    return {**asdict(case), "mean_context": context, "profiled_steps": args.steps, "batches_collected": collected,
            "preemptions": engine.stats().num_preemptions - preemptions,
            "step_wall_ms": statistics.median(unprofiled) * 1e3,
            "step_wall_profiled_ms": statistics.median(walls) * 1e3,
            "ranks": ranks,
            "kernel_ms_per_step_max": max(r["kernel_ms_per_step"] for r in ranks),
            "categories_ms_per_step_max": {c: max(r["categories_ms_per_step"][c] for r in ranks) for c in CATEGORIES}}


def print_case(r: dict) -> None:
    print(f"\n-- {r['name']}: {r['decode_rows']} decoding (context {r['mean_context']:.0f}) + {r['prefill_prompts']} "
          f"x {r['prefill_len']}-token prompts, preemptions {r['preemptions']}")
    print(f"   step wall {r['step_wall_ms']:.2f} ms not profiled / {r['step_wall_profiled_ms']:.2f} ms profiled; "
          f"{r['profiled_steps']} steps profiled ({r['batches_collected']} batches collected)")
    print(f"   {'rank':>4} {'tp':>3} {'pp':>3} {'ep':>3} {'kernel ms/step':>15} {'kernels/step':>13}")
    for rank in r["ranks"]:
        print(f"   {rank['rank']:>4} {rank['tp_rank']:>3} {rank['pp_rank']:>3} {rank['ep_rank']:>3} "
              f"{rank['kernel_ms_per_step']:>15.3f} {rank['kernels_per_step']:>13.0f}")
    first = r["ranks"][0]
    total = first["kernel_ms_per_step"] or 1.0
    print(f"   {'category':<16} {'rank 0 ms':>10} {'share':>7} {'max over ranks':>15}")
    for category, ms in sorted(first["categories_ms_per_step"].items(), key=lambda kv: -kv[1]):
        top = r["categories_ms_per_step_max"][category]
        if ms or top:
            print(f"   {category:<16} {ms:>10.3f} {ms / total:>7.1%} {top:>15.3f}")
    print("   rank 0:")
    print_top_kernels(first)


def print_table(summary: dict) -> None:
    print(f"\n==== {summary['device']} | {summary['model']} | TP {summary['tp']} PP {summary['pp']} EP {summary['ep']} | "
          f"async scheduling {summary['async_scheduling']} | ms per step, categories max over ranks")
    head = "".join(f"{SHORT[c]:>8}" for c in CATEGORIES)
    print(f"{'case':<10}{'rows':>5}{'wall':>8}{'kern r0':>8}{'max':>8}{'#kern':>6}{head}")
    for r in summary["cases"].values():
        cats = "".join(f"{r['categories_ms_per_step_max'][c]:>8.3f}" for c in CATEGORIES)
        print(f"{r['name']:<10}{r['decode_rows'] + r['prefill_prompts']:>5}{r['step_wall_ms']:>8.2f}"
              f"{r['ranks'][0]['kernel_ms_per_step']:>8.3f}{r['kernel_ms_per_step_max']:>8.3f}"
              f"{r['ranks'][0]['kernels_per_step']:>6.0f}{cats}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_case_args(parser)  # --cases default here: b1,decode64
    parser.add_argument("--tp", type=int, default=2, help="tensor parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    parser.add_argument("--ep", type=int, default=1, help="expert parallel size")
    args = parser.parse_args(argv)
    check_case_args(args)
    world_size = args.tp * args.pp
    if world_size < 2:
        raise SystemExit("one rank runs in process: profile it with benchmarks/profile_gpu.py")
    if args.device == "cuda" and torch.cuda.device_count() < world_size:
        raise SystemExit(f"{world_size} ranks need {world_size} GPUs, this machine has {torch.cuda.device_count()}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    engine = build_engine(args)
    try:
        return profile_engine(engine, args, time.perf_counter() - start)
    finally:
        engine.shutdown()


def profile_engine(engine: LLMEngine, args: argparse.Namespace, startup_s: float) -> dict:
    hf_config = engine.loaded.hf_config
    is_moe = is_moe_model(hf_config)
    cases = select_cases(args.cases, *tp_cases(is_moe, args.small))
    # Warm-up: compiles the eager kernels of small shapes, and the first profiler session pays
    # the profiler's (CUPTI's) start-up on every rank, before any case is measured.
    warm = CaseDriver(engine, Case("warmup", 2, 16), 0)
    warm.wait_until_decoding()
    device = profile_ranks(engine, warm.step)[0].device
    warm.drain()
    print(f"device {device}; torch {torch.__version__}; {args.model} ({hf_config.num_hidden_layers} layers) at "
          f"TP {args.tp} PP {args.pp} EP {args.ep}; engine up in {startup_s:.1f} s, {engine.num_blocks} KV blocks",
          flush=True)
    summary: dict = {"device": device, "torch": torch.__version__, "model": args.model, "tp": args.tp, "pp": args.pp,
                     "ep": args.ep, "num_layers": hf_config.num_hidden_layers, "is_moe": is_moe,
                     "async_scheduling": engine.async_scheduling, "startup_s": startup_s,
                     "num_kv_blocks": engine.num_blocks, "args": vars(args),
                     "category_rules": dict(CATEGORY_RULES), "moe_routing_rule": MOE_ROUTING, "cases": {}}
    run_cases(cases, lambda case: run_case(engine, case, args, is_moe), print_case, summary,
              os.path.join(args.out, "profile_tp.json"))
    print_table(summary)
    return summary


if __name__ == "__main__":
    main()

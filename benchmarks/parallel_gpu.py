"""Tensor / pipeline / expert parallel benchmarks for the GPU machine (and the host overhead on CPU).

    python benchmarks/parallel_gpu.py                 # every GPU case the machine has cards for
    python benchmarks/parallel_gpu.py --cases tp      # tp | pp | ep | overhead (comma-separated)
    python benchmarks/parallel_gpu.py --cases overhead --device cpu   # host overhead, no GPU needed

Cases (dummy bf16 weights of real shapes; `shardserve.workers.bench` workloads and runs):
  tp:  Llama-3.1-8B, batch 1, 128 in / 256 out: decode tok/s (1 / time per output token) at
       TP = 1, 2, 4, with async scheduling (the default without PP: each step is launched before
       the previous one's ids are read back, by the driver and by every rank).
  tpsync: the same at TP = 1, 2 with synchronous steps, to show what the overlap buys.
  pp:  Llama-3.1-8B offline throughput (lognormal, medians 200 in / 180 out) at PP = 1 vs 2.
       PP 2 keeps 2 micro-batches in flight (workers/engine.py), each about half the running
       requests, so both stages stay busy. max_num_seqs bounds the requests running in all
       batches together: PP 2 runs with 256 (two batches of ~128) and with 512 (two of ~256,
       the batch size of PP 1; each GPU holds half the layers, so twice the KV tokens fit).
       `max_in_flight` reports the most batches the engine had in flight.
  ppwide: PP 1 with 512 running requests vs PP 2 with 1,024 (two micro-batches of ~512, each
       stage half the layers and twice the KV room): the batch per GPU step is PP 1's.
  ppfixed: ppwide with every request 200 in / 180 out: on the lognormal workload the longest
       request (1,795 output tokens) alone takes 1,796 sequential steps, which PP cannot shorten.
  ppmb: PP 1 (512 running) vs PP 2 on ppfixed's workload with 2 vs 3 micro-batches in flight (pipeline_micro_batches;
       max_num_seqs 1,024 vs 1,536: ~512 requests per micro-batch either way). With 2, stage 0
       idles while the driver applies the returned batch and sends its next step; a third batch
       gives it work meanwhile. The label's `mb` is the micro-batch count. Both run 3,072
       requests whatever --num-requests says (a case's `num_requests`): with 1,000, 1,536 slots
       would never fill and the 3 micro-batches would hold ~333 requests each.
  ppmblog: ppmb on the lognormal workload.
  ppbal: PP 1 vs PP 2 (3 micro-batches) with the layers split 17 / 15 instead of 16 / 16 (the last
       stage also runs the LM head and sampling, ~2 layers' worth at 512 rows), and PP 2 with 4
       micro-batches (2,048 running), on ppmb's workload.
  ppfig: ppmb's PP 1 and PP 2 x 3 rows. ppfigwarm: both after an unmeasured run of the whole
       workload (other prompts; tag `warm`). Every throughput case's log ends with its step
       timeline (step_timeline.py): where the run's time went, step by step.
  tpfused: Llama-3.1-8B batch-1 decode at TP 1, and TP 2 with the fused all-reduce + RMSNorm
       kernel off (SHARDSERVE_FUSED_ALLREDUCE_NORM=0), on with the flags protocol
       (SHARDSERVE_FUSED_ALLREDUCE_PROTOCOL=flags) and on with the default (Lamport).
  tpws: Llama-3.1-8B batch-1 decode at TP 1 and TP 2, each with cuBLAS's default workspace and
       with none (CUBLAS_WORKSPACE_CONFIG=:0:0: no split-K with a separate reduce kernel).
  ep:  Qwen3-30B-A3B offline throughput at TP 2 vs TP 2 + EP 2 (`auto` dispatch).
  epwide: the same with 1,024 running requests and 16,384 tokens per step (vLLM's limits).
  moelat: Qwen3-30B-A3B batch-1 decode at TP 2 and TP 2 + EP 2.
  overhead: driver-side cost of one step through the MultiprocExecutor at TP 2 on a tiny model:
       the round trip of an empty step (pickle, one pipe write per rank, worker wake-up and
       unpickle, output pickled back), and the pickle / unpickle time and size of a 256-request
       decode SchedulerOutput.
Each case runs in its own subprocess, so every engine starts on empty GPUs; a case that needs
more GPUs than the machine has is reported as skipped. The table ends with the device name.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

CASES = {
    "tp": [dict(kind="latency", model="dummy:llama-3.1-8b", tp=tp, pp=1, ep=1) for tp in (1, 2, 4)],
    # L2 prefetch of the next GEMMs' weights behind the fused all-reduce (experimental, off by
    # default): TP 2 / 4 without it, with a 16 MB and a 32 MB cap per call, on one machine.
    "tpl2": [dict(kind="latency", model="dummy:llama-3.1-8b", tp=tp, pp=1, ep=1, tag=f"l2-{mb}mb{run}",
                  env={"SHARDSERVE_L2_PREFETCH_MB": str(mb)})
             for tp in (2, 4) for mb, run in ((0, "a"), (16, ""), (32, ""), (0, "b"))],
    # Batch-1 projections: cuBLAS vs the PDL matrix-vector kernel (parallel/kernels/decode_linear.py),
    # TP 1 / 2 / 4, alternating on one machine.
    "tpgemv": [dict(kind="latency", model="dummy:llama-3.1-8b", tp=tp, pp=1, ep=1, tag=f"gemv-{flag}",
                    env={"SHARDSERVE_DECODE_GEMV": flag})
               for tp in (1, 2, 4) for flag in ("0", "1")],
    # TP 1 / 2 only (a two-GPU machine, e.g. two H200s for the peer cards).
    "tp12": [dict(kind="latency", model="dummy:llama-3.1-8b", tp=tp, pp=1, ep=1) for tp in (1, 2)],
    # TP 4 again with the step-time means (rank_timing): where the steps beyond the GPU median go.
    "tp4gemv": [dict(kind="latency", model="dummy:llama-3.1-8b", tp=tp, pp=1, ep=1, tag=f"gemv-{flag}",
                     env={"SHARDSERVE_DECODE_GEMV": flag}) for tp, flag in ((1, "1"), (4, "0"), (4, "1"))],
    # TP 4 batch 1 with the driver one more step ahead (SchedulerConfig.async_depth 3): is the
    # driver's turnaround what leaves TP 4's devices idle? Depth 2, 3, 3, 2 on one machine.
    "tp4depth": [dict(kind="latency", model="dummy:llama-3.1-8b", tp=4, pp=1, ep=1, async_depth=depth,
                      tag=f"depth{depth}{run}") for depth, run in ((2, "a"), (3, "a"), (3, "b"), (2, "b"))],
    "tpsync": [dict(kind="latency", model="dummy:llama-3.1-8b", tp=tp, pp=1, ep=1, async_scheduling=False)
               for tp in (1, 2)],
    "pp": [dict(kind="throughput", model="dummy:llama-3.1-8b", tp=1, pp=pp, ep=1, max_num_seqs=seqs)
           for pp, seqs in ((1, 256), (2, 256), (2, 512))],
    # PP 2 with twice PP 1's running requests: two micro-batches the size of PP 1's batch.
    "ppwide": [dict(kind="throughput", model="dummy:llama-3.1-8b", tp=1, pp=pp, ep=1, max_num_seqs=seqs)
               for pp, seqs in ((1, 512), (2, 1024))],
    # The same with fixed lengths (200 in / 180 out): no long request bounds the run's step count.
    "ppfixed": [dict(kind="throughput", model="dummy:llama-3.1-8b", tp=1, pp=pp, ep=1, max_num_seqs=seqs,
                     distribution="fixed") for pp, seqs in ((1, 512), (2, 1024))],
    # PP 2 with a third micro-batch in flight to hide the driver's turnaround; ~512 requests each
    # (3,072 requests: 3 full waves of 1,024, 2 of 1,536).
    # (the first row is the one-GPU baseline, 512 running, on the same 3,072 requests)
    "ppmb": [dict(kind="throughput", model="dummy:llama-3.1-8b", tp=1, pp=pp, ep=1, max_num_seqs=seqs,
                  pipeline_micro_batches=mb, distribution="fixed", num_requests=3072)
             for pp, mb, seqs in ((1, None, 512), (2, 2, 1024), (2, 3, 1536))],
    "ppmblog": [dict(kind="throughput", model="dummy:llama-3.1-8b", tp=1, pp=2, ep=1, max_num_seqs=seqs,
                     pipeline_micro_batches=mb, num_requests=3072) for mb, seqs in ((2, 1024), (3, 1536))],
    "ppbal": [dict(kind="throughput", model="dummy:llama-3.1-8b", tp=1, pp=pp, ep=1, max_num_seqs=seqs,
                   pipeline_micro_batches=mb, pipeline_layer_partition=split, distribution="fixed", num_requests=3072,
                   tag=f"split{'-'.join(map(str, split))}" if split else None)
              for pp, mb, seqs, split in ((1, None, 512, None), (2, 3, 1536, (17, 15)), (2, 4, 2048, None))],
    # The figure's pair (PP 1 vs PP 2 x 3 of ppmb); ppfigwarm: the same after a full unmeasured run
    # of the workload (shows whether one-time costs, first shapes, weigh on the shorter PP 2 run).
    **{name: [dict(kind="throughput", model="dummy:llama-3.1-8b", tp=1, pp=pp, ep=1, max_num_seqs=seqs,
                   pipeline_micro_batches=mb, distribution="fixed", num_requests=3072, warm_full=warm,
                   tag="warm" if warm else None) for pp, mb, seqs in ((1, None, 512), (2, 3, 1536))]
       for name, warm in (("ppfig", False), ("ppfigwarm", True))},
    "tpfused": [dict(kind="latency", model="dummy:llama-3.1-8b", tp=1, pp=1, ep=1)]
               + [dict(kind="latency", model="dummy:llama-3.1-8b", tp=2, pp=1, ep=1, tag=tag, env=env)
                  for tag, env in (("unfused", {"SHARDSERVE_FUSED_ALLREDUCE_NORM": "0"}),
                                   ("fused-flags", {"SHARDSERVE_FUSED_ALLREDUCE_PROTOCOL": "flags"}),
                                   ("fused-lamport", {}))],
    "tpws": [dict(kind="latency", model="dummy:llama-3.1-8b", tp=tp, pp=1, ep=1, tag=tag, env=env)
             for tp in (1, 2) for tag, env in (("ws-default", {}), ("ws0", {"CUBLAS_WORKSPACE_CONFIG": ":0:0"}))],
    "ep": [dict(kind="throughput", model="dummy:qwen3-30b-a3b", tp=2, pp=1, ep=ep) for ep in (1, 2)],
    # vLLM's own limits on an H100 (vllm_bench.py prints them): more rows per step share each
    # expert's weight read.
    "epwide": [dict(kind="throughput", model="dummy:qwen3-30b-a3b", tp=2, pp=1, ep=ep, max_num_seqs=1024,
                    max_num_batched_tokens=16384) for ep in (1, 2)],
    "moelat": [dict(kind="latency", model="dummy:qwen3-30b-a3b", tp=2, pp=1, ep=ep) for ep in (1, 2)],
    "overhead": [dict(kind="overhead", model="dummy:tiny-llama", tp=2, pp=1, ep=1)],
}


def _engine(case: dict, device: str, num_requests: int):
    from shardserve.workers.config import EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
    from shardserve.workers.engine import LLMEngine

    config = EngineConfig(
        model=ModelConfig(model=case["model"], dtype="bfloat16" if device != "cpu" else "float32", device=device),
        scheduler=SchedulerConfig(max_num_seqs=case.get("max_num_seqs", 256),
                                  max_num_batched_tokens=case.get("max_num_batched_tokens", 8192),
                                  async_scheduling=case.get("async_scheduling"),
                                  async_depth=case.get("async_depth", 2)),
        parallel=ParallelConfig(tensor_parallel_size=case["tp"], pipeline_parallel_size=case["pp"],
                                expert_parallel_size=case["ep"],
                                pipeline_micro_batches=case.get("pipeline_micro_batches"),
                                pipeline_layer_partition=tuple(case["pipeline_layer_partition"])
                                if case.get("pipeline_layer_partition") else None),
    )
    return LLMEngine(config)


def run_case(case: dict, device: str, num_requests: int) -> dict:
    """Build the engine of one case, warm it up, measure; returns a JSON-able dict."""
    from shardserve.workers.bench.runs import run_throughput
    from shardserve.workers.bench.workload import Workload
    from step_timeline import StepTimeline  # beside this script

    engine = _engine(case, device, num_requests)
    try:
        vocab = engine.loaded.hf_config.vocab_size
        if case["kind"] == "overhead":
            return _overhead(engine)
        run_throughput(engine, Workload(2, 32, 8).sample(vocab))  # warm-up
        if case["kind"] == "latency":
            requests = Workload(1, 128, 256).sample(vocab)
            result, timings = _timed(engine, lambda: run_throughput(engine, requests))
            for timing in timings:  # into the case's log: is every rank's host keeping its device fed?
                print(timing.line(), flush=True)
            return {"decode_tok_s": 1.0 / result.mean_tpot_s, "output_tok_s": result.output_tokens_per_s,
                    "max_gap_ms": max(t.gap_ms for t in timings),
                    "max_mean_gap_ms": max(t.gap_mean_ms for t in timings),
                    "max_mean_gpu_ms": max(t.gpu_mean_ms for t in timings), "max_launch_ms": max(t.launch_ms for t in timings),
                    "max_driver_p90_ms": max(t.driver_p90_ms for t in timings),
                    "max_prep_p90_ms": max(t.prep_p90_ms for t in timings)}
        workload = Workload(case.get("num_requests", num_requests), 200, 180,
                            distribution=case.get("distribution", "lognormal"))
        if case.get("warm_full"):  # the whole workload once first (other prompts: no prefix-cache hits)
            run_throughput(engine, replace(workload, seed=workload.seed + 1).sample(vocab))
        engine.executor = engine.batches.executor = timeline = StepTimeline(engine.executor)  # every step through it
        result = run_throughput(engine, workload.sample(vocab))
        print(timeline.summary(), flush=True)  # into the case's log: where the run's time went
        return {"output_tok_s": result.output_tokens_per_s, "requests_s": result.requests_per_s,
                "mean_ttft_s": result.mean_ttft_s, "mean_tpot_s": result.mean_tpot_s,
                "max_in_flight": engine.stats().max_batches_in_flight}
    finally:
        engine.shutdown()


def _timed(engine, run: Callable[[], Any]) -> tuple[Any, list]:
    """run()'s result and each rank's step timing over it (bench/rank_timing.py); in process
    (TP 1, no worker ranks) the engine's own runner is rank 0."""
    from shardserve.workers.bench.rank_timing import start_timing, stop_timing, time_ranks

    call = getattr(engine.executor, "call", None)
    if call is not None:
        return time_ranks(call, run)
    start_timing(engine.runner.step_times)
    try:
        result = run()
    finally:
        timing = stop_timing(0, engine.runner.step_times)
    return result, [timing]


def _overhead(engine) -> dict:
    from shardserve.workers.request import SamplingParams
    from shardserve.workers.step_types import NewRequestData, ScheduledRequest, SchedulerOutput

    empty = SchedulerOutput(new_requests=(), scheduled=(), num_batched_tokens=0)
    for _ in range(20):
        engine.executor.execute(empty)
    num_steps = 500
    start = time.perf_counter()
    for _ in range(num_steps):
        engine.executor.execute(empty)
    round_trip = (time.perf_counter() - start) / num_steps
    # A decode step of 256 running requests, 2,000-token contexts (125 blocks each), 8 of them new
    # (their whole tables go out) and one in 16 of the others crossing into a new block.
    scheduled = tuple(ScheduledRequest(f"req-{i}", (1234,), 2000,
                                       tuple(range(i * 125, (i + 1) * 125)) if i < 8 else (i,) * (i % 16 == 0), True)
                      for i in range(256))
    new = tuple(NewRequestData(f"req-{i}", tuple(range(200)), (), SamplingParams()) for i in range(8))
    big = SchedulerOutput(new_requests=new, scheduled=scheduled, num_batched_tokens=256)
    start = time.perf_counter()
    for _ in range(200):
        payload = pickle.dumps(("step", big), protocol=pickle.HIGHEST_PROTOCOL)
    dumps = (time.perf_counter() - start) / 200
    start = time.perf_counter()
    for _ in range(200):
        pickle.loads(payload)
    loads = (time.perf_counter() - start) / 200
    return {"empty_step_round_trip_us": round_trip * 1e6, "decode256_pickle_us": dumps * 1e6,
            "decode256_unpickle_us": loads * 1e6, "decode256_bytes": len(payload)}


def _device_label(device: str) -> str:
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        return "cpu"
    return f"{torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}"


def _save_log(out: str | None, case: dict, stdout: str | bytes | None, stderr: str | bytes | None) -> None:
    if out is None:
        return
    os.makedirs(out, exist_ok=True)
    name = "-".join(f"{k}{case[k]}" for k in ("kind", "tp", "pp", "ep")) + f"-seqs{case.get('max_num_seqs', 256)}"
    name += "-sync" if case.get("async_scheduling") is False else ""
    name += "-fixed" if case.get("distribution") == "fixed" else ""
    name += f"-mb{case['pipeline_micro_batches']}" if case.get("pipeline_micro_batches") else ""
    name += f"-{case['tag']}" if case.get("tag") else ""
    text = "".join(t.decode() if isinstance(t, bytes) else (t or "") for t in (stdout, stderr))
    with open(os.path.join(out, f"{name}.log"), "w") as f:
        f.write(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="tp,pp,ep,overhead", help="comma-separated: " + ", ".join(CASES))
    parser.add_argument("--device", default="auto", help="auto | cuda | cpu")
    parser.add_argument("--num-requests", type=int, default=1000, help="requests of the throughput cases")
    parser.add_argument("--case-timeout-s", type=float, default=300.0, help="kill a case that runs longer")
    parser.add_argument("--out", default=None, help="folder for each case's full log (stdout + stderr)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one case (JSON) and print JSON
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_case(json.loads(args.one), args.device, args.num_requests)), flush=True)
        return

    import torch

    num_gpus = torch.cuda.device_count() if args.device != "cpu" else 0
    rows = []
    for name in args.cases.split(","):
        for case in CASES[name]:
            world = case["tp"] * case["pp"]
            label = f"{name:8s} {case['model']:22s} tp={case['tp']} pp={case['pp']} ep={case['ep']}"
            if "max_num_seqs" in case:
                label += f" seqs={case['max_num_seqs']}"
            if case.get("pipeline_micro_batches"):
                label += f" mb={case['pipeline_micro_batches']}"
            if case.get("tag"):
                label += f" {case['tag']}"
            if case["kind"] != "overhead" and world > num_gpus:
                rows.append((label, f"skipped: needs {world} GPUs, have {num_gpus}"))
                continue
            cmd = [sys.executable, __file__, "--one", json.dumps(case), "--device", args.device,
                   "--num-requests", str(args.num_requests)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.case_timeout_s,
                                      env={**os.environ, **case.get("env", {})})
            except subprocess.TimeoutExpired as exc:
                _save_log(args.out, case, exc.stdout, exc.stderr)
                rows.append((label, f"TIMED OUT after {args.case_timeout_s:.0f} s"))
                print(f"{label}  {rows[-1][1]}", flush=True)
                continue
            _save_log(args.out, case, proc.stdout, proc.stderr)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                rows.append((label, f"FAILED (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"))
                continue
            result = json.loads(lines[-1][len("RESULT "):])
            rows.append((label, "  ".join(f"{k}={v:,.1f}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in result.items())))
            print(f"{label}  {rows[-1][1]}", flush=True)
    print()
    print(f"{'case':62s} result")
    for label, text in rows:
        print(f"{label:62s} {text}")
    print(f"device: {_device_label(args.device)}")


if __name__ == "__main__":
    main()

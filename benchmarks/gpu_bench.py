"""One device call: kernel check, correctness of the fast path, latency, throughput, HF baseline.

Data flow: (1) `kernels_gpu_check.py` runs in a subprocess (every Triton kernel against its
torch reference at Llama-3.1-8B size). (2) One engine on `dummy:llama-3.1-8b` (bf16) is built
— Triton attention, fused kernels, decode CUDA graphs — and its start-up time and graph pool
are logged. (3) Correctness: a few requests generate greedily on the fast path; the same
model with the torch path (no kernels, torch attention, eager) scores every generated token
teacher-forced: each must be within max(`--logprob-tol`, 2 x noise) nats of the reference's
best token, and the fast path's own teacher-forced logprobs within the same of the
reference's, where noise is the torch path against itself chunked differently (bf16 floor).
(4) `bench latency` cases (batch 1, 8, 32, 64; 16-token prompts; 256 new tokens), batch 1
also with graphs off, each with achieved GB/s against the copy bandwidth measured here and
host vs GPU time per step. (5) `bench throughput`: 1,000 lognormal requests (medians 200 /
180, sigma 0.8). (6) The engine is freed and transformers `generate` runs batch-1 latency and
the throughput workload's first `--hf-requests` requests (labelled). Full logs and a JSON go
to $OUT (or --out); the last lines are the summary table with the device name.

Run: `python benchmarks/gpu_bench.py` (benchmarks/README.md: the commands behind each figure).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict

import torch
from shardserve.workers.attention.backend import get_attention_backend
from shardserve.workers.bench.device import copy_bandwidth, device_name
from shardserve.workers.bench.hf_baseline import hf_generate, load_hf_model
from shardserve.workers.bench.runs import run_engine, run_latency, run_throughput
from shardserve.workers.bench.workload import Workload
from shardserve.workers.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from shardserve.workers.engine import LLMEngine
from shardserve.workers.models.layers import set_fused_kernels
from shardserve.workers.runner.inputs import build_model_inputs
from shardserve.workers.runner.kv_budget import KVCacheLayout, allocate_kv_caches
from shardserve.workers.step_types import ScheduledRequest, SchedulerOutput


def kernel_check(out_dir: str) -> str:
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels_gpu_check.py")
    proc = subprocess.run([sys.executable, script, "--iters", "10"], capture_output=True, text=True)
    with open(os.path.join(out_dir, "kernels_gpu_check.log"), "w") as f:
        f.write(proc.stdout + proc.stderr)
    lines = (proc.stdout.strip().splitlines() or ["no output"])
    return f"{'ok' if proc.returncode == 0 else 'FAILED'} ({lines[-1]})"


@torch.inference_mode()
def teacher_forced_logprobs(engine: LLMEngine, token_ids: list[int], split: int) -> torch.Tensor:
    """[len - split - 1, vocab] log-softmax at positions split..len-2 of `token_ids`, computed by
    the model's current path: first `split` tokens as one prefill, the rest as a cached-prefix chunk."""
    runner = engine.runner
    block_size = runner.block_size
    num_blocks = -(-len(token_ids) // block_size)
    caches = allocate_kv_caches(KVCacheLayout.of_model(runner.model, block_size), num_blocks + 1, runner.device)
    blocks = tuple(range(1, num_blocks + 1))
    hidden = None
    for start, end in ((0, split), (split, len(token_ids))):
        req = ScheduledRequest("ref", tuple(token_ids[start:end]), start, blocks, True)
        inputs = build_model_inputs(SchedulerOutput((), (req,), end - start), block_size, runner.device)
        hidden = runner.model(inputs.input_ids, inputs.positions, caches, inputs.attn_metadata)
    return runner.model.compute_logits(hidden[:-1]).float().log_softmax(-1)


def correctness(engine: LLMEngine, tol: float) -> dict:
    vocab_size = engine.loaded.hf_config.vocab_size
    requests = Workload(4, 24, 32, seed=7).sample(vocab_size)
    finals = sorted(run_engine(engine, requests), key=lambda f: int(f.request_id.split("-")[1]))
    runner = engine.runner
    gaps, fast_diffs, noise_diffs, argmax_match, total = [], [], [], 0, 0
    for req, final in zip(requests, finals, strict=True):
        generated = list(final.outputs[0].token_ids)
        seq, split = req.prompt_token_ids + generated, len(req.prompt_token_ids) - 1
        fast = teacher_forced_logprobs(engine, seq, split)  # kernels + Triton attention, [gen, vocab]
        set_fused_kernels(False)
        runner.model.set_attention_backend(get_attention_backend("torch"))
        try:
            ref = teacher_forced_logprobs(engine, seq, split)  # the torch path: the reference
            noise = teacher_forced_logprobs(engine, seq, split // 2)[split - split // 2 :]  # same, chunked otherwise
        finally:
            set_fused_kernels(True)
            runner.model.set_attention_backend(get_attention_backend("triton"))
        index = torch.tensor(generated, device=ref.device)[:, None]
        chosen = ref.gather(1, index)[:, 0]
        best = ref.max(dim=1)
        gaps.append((best.values - chosen).max().item())
        fast_diffs.append((fast.gather(1, index) - ref.gather(1, index)).abs().max().item())
        noise_diffs.append((noise.gather(1, index) - ref.gather(1, index)).abs().max().item())
        argmax_match += int((best.indices.cpu() == torch.tensor(generated)).sum())
        total += len(generated)
    # Graphs vs eager on the same kernels: greedy tokens (split counts differ: float noise only).
    runner.set_cuda_graphs(False)
    eager = sorted(run_engine(engine, requests), key=lambda f: int(f.request_id.split("-")[1]))
    runner.set_cuda_graphs(True)
    same = sum(a == b for f, e in zip(finals, eager, strict=True)
               for a, b in zip(f.outputs[0].token_ids, e.outputs[0].token_ids, strict=True))
    # bf16 noise floor: the reference against itself computed in other chunks (other GEMM shapes).
    noise, max_gap, fast_diff = max(noise_diffs), max(gaps), max(fast_diffs)
    ok = max_gap <= max(tol, 2 * noise) and fast_diff <= max(tol, 2 * noise)
    return {"ok": ok, "max_gap_to_ref_best": max_gap, "max_fast_vs_ref_logprob_diff": fast_diff,
            "bf16_noise_floor": noise, "argmax_match": argmax_match / total, "graph_vs_eager_token_match": same / total}


def step_breakdown(walls: list[float], times) -> dict:
    """Where an offline run's time went: engine-step wall time by kind of step (decode-only by
    batch size, or with prefill tokens), with the runner's host / GPU split of the same steps."""
    if len(walls) != len(times.rows):  # an empty step (nothing schedulable) shifts the alignment
        return {"aligned": False, "num_steps": len(walls)}
    kinds: dict[str, list[tuple[float, int, int]]] = {}
    for wall, rows, tokens in zip(walls, times.rows, times.tokens, strict=True):
        if tokens == rows:
            kind = next(f"decode <= {b}" for b in (8, 32, 64, 128, 256, 512, 1 << 30) if rows <= b)
        else:
            kind = "with prefill"
        kinds.setdefault(kind, []).append((wall, rows, tokens))
    out = {"aligned": True, "num_steps": len(walls), "total_s": sum(walls)}
    for kind, steps in sorted(kinds.items()):
        total = sum(w for w, _, _ in steps)
        out[kind] = {"steps": len(steps), "wall_s": total, "mean_ms": total / len(steps) * 1e3,
                     "mean_rows": statistics.fmean(r for _, r, _ in steps),
                     "mean_tokens": statistics.fmean(t for _, _, t in steps)}
    sampled = [(h, g) for h, g in zip(times.host_s, times.gpu_s, strict=False)]
    if sampled:
        out["median_host_ms"] = statistics.median(h for h, _ in sampled) * 1e3
        out["median_gpu_ms"] = statistics.median(g for _, g in sampled) * 1e3
    return out


def build_engine(args: argparse.Namespace) -> tuple[LLMEngine, float]:
    config = EngineConfig(
        model=ModelConfig(model=args.model, dtype="bfloat16", device="cuda"),
        cache=CacheConfig(gpu_memory_utilization=args.gpu_memory_utilization),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                  min_admit_batch=args.min_admit_batch, async_scheduling={'auto': None, 'on': True, 'off': False}[args.async_scheduling]),
    )
    start = time.perf_counter()
    engine = LLMEngine(config)
    return engine, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dummy:llama-3.1-8b")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--min-admit-batch", type=int, default=1, help="SchedulerConfig.min_admit_batch")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--async-scheduling", choices=["auto", "on", "off"], default="auto",
                        help="SchedulerConfig.async_scheduling (auto: on with one pipeline stage)")
    parser.add_argument("--batch-sizes", default="1,8,32,64")
    parser.add_argument("--num-requests", type=int, default=1000)
    parser.add_argument("--hf-requests", type=int, default=32, help="transformers runs this many (one batch)")
    parser.add_argument("--throughput-ab", action="store_true",
                        help="also run the throughput case with mixed-step graphs off (same run)")
    parser.add_argument("--logprob-tol", type=float, default=0.1)
    parser.add_argument("--skip", nargs="*", default=[], choices=["kernels", "check", "latency", "throughput", "hf"])
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cuda")
    name = device_name(device)
    bandwidth = copy_bandwidth(device)
    print(f"device {name}; torch {torch.__version__}; copy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    summary: dict = {"device": name, "copy_bandwidth": bandwidth, "args": vars(args)}
    if "kernels" not in args.skip:
        summary["kernel_check"] = kernel_check(args.out)
        print(f"kernel check: {summary['kernel_check']}", flush=True)

    engine, startup_s = build_engine(args)
    runner = engine.runner
    graph_mib = runner.graph_pool_bytes / 2**20
    summary.update(startup_s=startup_s, num_kv_blocks=runner.num_blocks, graph_pool_mib=graph_mib)
    print(f"engine up in {startup_s:.1f} s; {runner.num_blocks} KV blocks; graphs {runner.graph_sizes[0]}.."
          f"{runner.graph_sizes[-1]} ({len(runner.graph_sizes)}) + {len(runner.token_buckets)} token buckets, "
          f"pool {graph_mib:.0f} MiB", flush=True)
    vocab_size = engine.loaded.hf_config.vocab_size
    run_engine(engine, Workload(4, 16, 8, seed=99).sample(vocab_size))  # warm-up (compiles eager kernels)
    if "check" not in args.skip:
        summary["check"] = correctness(engine, args.logprob_tol)
        print(f"correctness: {summary['check']}", flush=True)

    latency = []
    if "latency" not in args.skip:
        cases = [(int(b), True) for b in args.batch_sizes.split(",")] + [(1, False)]
        for batch_size, graphs in cases:
            runner.set_cuda_graphs(graphs)
            requests = Workload(batch_size, 16, 256, seed=batch_size).sample(vocab_size)
            result = asdict(run_latency(engine, requests, bandwidth))
            result["cuda_graphs"] = graphs
            latency.append(result)
            print(f"latency b{batch_size} graphs={graphs}: {result['decode_tokens_per_s']:.1f} tok/s, step "
                  f"{result['step_time_s'] * 1e3:.2f} ms (host {result['host_ms_per_step']:.3f} ms, GPU "
                  f"{result['gpu_ms_per_step']:.2f} ms), {result['achieved_bandwidth'] / bandwidth:.1%} of copy",
                  flush=True)
        runner.set_cuda_graphs(True)
    summary["latency"] = latency

    if "throughput" not in args.skip:
        workload = Workload(args.num_requests, 200, 180, "lognormal", 0.8, max_len=engine.max_model_len // 2, seed=0)
        requests = workload.sample(vocab_size)
        # A/B in the same run: steps with prefill tokens eager (the previous version) vs replayed
        # from the mixed-step graphs; decode graphs on in both.
        for label, mixed in (("mixed_eager", False), ("mixed_graphs", True)):
            if label == "mixed_eager" and not args.throughput_ab:
                continue
            runner.set_cuda_graphs(True, mixed=mixed)
            times = runner.step_times
            times.clear()
            times.enabled = True
            before = engine.stats().num_preemptions
            walls: list[float] = []
            ours = run_throughput(engine, requests, walls)
            times.enabled = False
            result = {**asdict(ours), "preemptions": engine.stats().num_preemptions - before,
                      "graph_steps": times.graph_steps, "mixed_graph_steps": times.mixed_graph_steps,
                      "eager_steps": times.eager_steps, "steps": step_breakdown(walls, times)}
            summary["throughput" if mixed else "throughput_mixed_eager"] = result
            print(f"throughput ({label}): {ours.output_tokens_per_s:.0f} output tok/s, {ours.requests_per_s:.1f} "
                  f"req/s, {ours.output_tokens} tokens in {ours.elapsed_s:.1f} s; steps: decode graphs "
                  f"{times.graph_steps}, mixed graphs {times.mixed_graph_steps}, eager {times.eager_steps}; "
                  f"preemptions {result['preemptions']}", flush=True)
            print(f"  step breakdown: {json.dumps(result['steps'], default=lambda v: round(v, 4))}", flush=True)
        runner.set_cuda_graphs(True)

    hf = {}
    if "hf" not in args.skip:
        loaded, model_config = engine.loaded, engine.config.model
        del engine, runner
        gc.collect()
        torch.cuda.empty_cache()
        hf_model = load_hf_model(model_config, loaded, device, torch.bfloat16)
        one = Workload(1, 16, 256, seed=1).sample(vocab_size)
        hf_generate(hf_model, Workload(1, 16, 8, seed=2).sample(vocab_size), 1, device)  # warm-up
        seconds, useful = hf_generate(hf_model, one, 1, device)
        hf["latency_b1_tokens_per_s"] = useful / seconds
        if "throughput" not in args.skip:
            subset = requests[: args.hf_requests]
            seconds, useful = hf_generate(hf_model, subset, len(subset), device)
            hf["throughput_tokens_per_s"] = useful / seconds
            hf["throughput_num_requests"] = len(subset)
        print(f"transformers: {hf}", flush=True)
    summary["hf"] = hf
    with open(os.path.join(args.out, "gpu_bench.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    print_table(summary)


def print_table(s: dict) -> None:
    bw = s["copy_bandwidth"]
    print(f"\n==== {s['device']} | copy {bw / 1e9:.0f} GB/s | start-up {s.get('startup_s', 0):.0f} s | "
          f"kernels {s.get('kernel_check', 'skipped')} | check {s.get('check', {}).get('ok', 'skipped')}")
    print(f"{'case':<22} {'tok/s':>9} {'step ms':>8} {'host ms':>8} {'GPU ms':>7} {'floor ms':>8} {'of copy':>8}")
    for r in s["latency"]:
        floor_ms = r["bytes_per_step"] / bw * 1e3
        label = f"decode b{r['batch_size']}{'' if r['cuda_graphs'] else ' eager'}"
        print(f"{label:<22} {r['decode_tokens_per_s']:>9.1f} {r['step_time_s'] * 1e3:>8.2f} "
              f"{r['host_ms_per_step']:>8.3f} {r['gpu_ms_per_step']:>7.2f} {floor_ms:>8.2f} "
              f"{r['achieved_bandwidth'] / bw:>8.1%}")
    hf = s.get("hf", {})
    if "throughput" in s:
        t = s["throughput"]
        print(f"{'throughput 1000 req':<22} {t['output_tokens_per_s']:>9.0f} output tok/s, {t['requests_per_s']:.1f} req/s")
        if "throughput_mixed_eager" in s:
            e = s["throughput_mixed_eager"]
            print(f"{'  mixed steps eager':<22} {e['output_tokens_per_s']:>9.0f} output tok/s -> mixed graphs "
                  f"{t['output_tokens_per_s'] / e['output_tokens_per_s']:.2f}x")
        if "throughput_tokens_per_s" in hf:
            print(f"{'transformers':<22} {hf['throughput_tokens_per_s']:>9.0f} output tok/s (first "
                  f"{hf['throughput_num_requests']} requests, one padded batch) -> ours "
                  f"{t['output_tokens_per_s'] / hf['throughput_tokens_per_s']:.1f}x")
    if "latency_b1_tokens_per_s" in hf and s["latency"]:
        print(f"{'transformers b1':<22} {hf['latency_b1_tokens_per_s']:>9.1f} tok/s -> ours "
              f"{s['latency'][0]['decode_tokens_per_s'] / hf['latency_b1_tokens_per_s']:.1f}x")


if __name__ == "__main__":
    main()

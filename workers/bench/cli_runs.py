"""The two benchmark procedures behind `shardserve bench`: build, warm up, measure, print.

Each returns a JSON-able dict of every figure and prints a short table whose last lines give
the device, ours, transformers' and the ratio.
"""

from __future__ import annotations

import argparse
import gc
import time
from dataclasses import asdict

import torch
from shardserve.workers.bench.device import copy_bandwidth, device_name
from shardserve.workers.bench.hf_baseline import hf_generate, load_hf_model
from shardserve.workers.bench.runs import run_engine, run_latency, run_throughput
from shardserve.workers.bench.workload import Workload
from shardserve.workers.config import EngineConfig, ModelConfig, SchedulerConfig
from shardserve.workers.engine import LLMEngine


def _engine(args: argparse.Namespace) -> LLMEngine:
    config = EngineConfig(
        model=ModelConfig(model=args.model, dtype=args.dtype, device=args.device),
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens, mode=args.mode,
            min_admit_batch=args.min_admit_batch,
        ),
    )
    return LLMEngine(config)


def _hf(engine: LLMEngine, args: argparse.Namespace):
    device = engine.runner.device
    dtype = next(engine.runner.model.parameters()).dtype
    return load_hf_model(engine.config.model, engine.loaded, device, dtype)


def _free(model) -> None:
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_latency_bench(args: argparse.Namespace) -> dict:
    engine = _engine(args)
    device = engine.runner.device
    vocab_size = engine.loaded.hf_config.vocab_size
    bandwidth = copy_bandwidth(device)
    name = device_name(device)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    # Warm-up: first steps pay allocator and kernel-selection costs.
    run_engine(engine, Workload(2, args.input_len, 8, seed=99).sample(vocab_size))
    rows = []
    for batch_size in batch_sizes:
        requests = Workload(batch_size, args.input_len, args.output_len, seed=batch_size).sample(vocab_size)
        ours = run_latency(engine, requests, bandwidth)
        rows.append({"ours": asdict(ours), "requests": requests})
    hf_model = None if args.no_hf else _hf(engine, args)
    print(f"device: {name}; copy bandwidth {bandwidth / 1e9:.1f} GB/s; model {engine.loaded.name}")
    print(f"{'batch':>5} {'step ms':>8} {'host ms':>8} {'GPU ms':>7} {'dec tok/s':>9} {'GB/s':>8} {'of copy':>7} "
          f"{'HF tok/s':>9} {'ratio':>6}")
    results = []
    for row in rows:
        ours = row["ours"]
        hf_tps = None
        if hf_model is not None:
            requests = row["requests"]
            hf_generate(hf_model, requests[:1], len(requests), device)  # warm-up
            seconds, useful = hf_generate(hf_model, requests, len(requests), device)
            hf_tps = useful / seconds
        ratio = ours["tokens_per_s"] / hf_tps if hf_tps else None
        print(
            f"{ours['batch_size']:>5} {ours['step_time_s'] * 1e3:>8.2f} {ours['host_ms_per_step']:>8.3f} "
            f"{ours['gpu_ms_per_step']:>7.2f} {ours['decode_tokens_per_s']:>9.1f} "
            f"{ours['achieved_bandwidth'] / 1e9:>8.1f} {ours['achieved_bandwidth'] / bandwidth:>7.0%} "
            f"{hf_tps or float('nan'):>9.1f} {ratio or float('nan'):>6.2f}"
        )
        results.append({**ours, "hf_tokens_per_s": hf_tps, "ratio_vs_hf": ratio})
    return {"device": name, "copy_bandwidth": bandwidth, "model": engine.loaded.name, "results": results}


def run_throughput_bench(args: argparse.Namespace) -> dict:
    engine = _engine(args)
    device = engine.runner.device
    vocab_size = engine.loaded.hf_config.vocab_size
    name = device_name(device)
    workload = Workload(
        args.num_requests, args.input_len, args.output_len, args.distribution, args.sigma,
        max_len=engine.max_model_len // 2, seed=args.seed,
    )
    requests = workload.sample(vocab_size)
    run_engine(engine, Workload(4, 16, 8, seed=99).sample(vocab_size))  # warm-up
    ours = run_throughput(engine, requests)
    stats = engine.stats()
    hf_tps = None
    if not args.no_hf:
        hf_model = _hf(engine, args)
        hf_requests = requests[: args.hf_num_requests] if args.hf_num_requests else requests
        hf_generate(hf_model, hf_requests[:1], 1, device)  # warm-up
        seconds, useful = hf_generate(hf_model, hf_requests, args.hf_batch_size, device)
        hf_tps = useful / seconds
        _free(hf_model)
    cost = ours.cost_per_million_tokens(args.price_per_hour)
    print(f"device: {name}; model {engine.loaded.name}; {ours.num_requests} requests "
          f"({args.distribution}, in {args.input_len} / out {args.output_len}), mode {args.mode}")
    print(f"ours: {ours.output_tokens_per_s:.1f} output tok/s, {ours.requests_per_s:.2f} req/s, "
          f"TTFT mean {ours.mean_ttft_s * 1e3:.0f} ms p99 {ours.p99_ttft_s * 1e3:.0f} ms, "
          f"TPOT mean {ours.mean_tpot_s * 1e3:.1f} ms p99 {ours.p99_tpot_s * 1e3:.1f} ms, "
          f"${cost:.3f} per 1M output tokens at ${args.price_per_hour}/h; preemptions {stats.num_preemptions}")
    if hf_tps is not None:
        print(f"transformers generate (padded static batches of {args.hf_batch_size}): {hf_tps:.1f} output tok/s")
        print(f"ratio ours / transformers: {ours.output_tokens_per_s / hf_tps:.2f}x")
    return {
        "device": name, "model": engine.loaded.name, "workload": asdict(workload), "ours": asdict(ours),
        "cost_per_million_output_tokens": cost, "hf_output_tokens_per_s": hf_tps,
        "ratio_vs_hf": None if hf_tps is None else ours.output_tokens_per_s / hf_tps,
        "timestamp": time.time(),
    }

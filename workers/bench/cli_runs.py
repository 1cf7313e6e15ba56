"""The two benchmark procedures behind `shardserve bench`: build, warm up, measure, print.

Each returns a JSON-able dict of every figure and prints a short table whose last lines give
the device, ours, transformers' and the ratio.

`--tensor-parallel-size/-tp`, `--pipeline-parallel-size/-pp`, `--expert-parallel-size/-ep` and
`--pipeline-micro-batches` become the engine's ParallelConfig. With world = TP x PP > 1 the model
runs in world worker processes (workers/worker/executor.py) and this process holds no weights,
so (details in runs.py):
  - device and dtype come from the engine config (LoadedModel.device / .dtype, i.e.
    resolve_device / resolve_dtype), not from an in-process model;
  - latency: per-step host / GPU times are on the ranks; the table shows the driver's median
    engine.step() wall time instead (`wall ms`) and says so; GB/s is per GPU (bytes one GPU of
    each pipeline stage reads per step, summed over the stages, computed from the model config)
    against the copy bandwidth of one device;
  - the transformers baseline is loaded after our measurements and after the worker group is
    shut down, on one device (the driver's: cuda:0 on GPU) with the whole model: the
    single-device figure the parallel engine is compared with. It must fit one device;
  - throughput: cost per token is at price-per-hour x world devices.
With world 1 everything is as before. `--price-per-hour` also prices the engine (`_cost_config`, workers/cost.py).
"""

from __future__ import annotations

import argparse
import gc
import time
from dataclasses import asdict

import torch
from shardserve.workers.bench.device import copy_bandwidth, device_name
from shardserve.workers.bench.hf_baseline import hf_generate, load_hf_model
from shardserve.workers.bench.runs import rank_bytes, run_engine, run_latency, run_throughput
from shardserve.workers.bench.spec_runs import SpecStartupError, run_speculative_bench, speculative_config
from shardserve.workers.bench.workload import Workload
from shardserve.workers.config import CostConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from shardserve.workers.engine import LLMEngine
from shardserve.workers.models.loader import load_model, resolve_device, resolve_dtype


class BenchConfigError(ValueError):
    """A flag value the engine cannot run with; the CLI prints it without a traceback."""


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The engine config of the flags; raises ValueError naming the bad field and its range."""
    config = EngineConfig(
        model=ModelConfig(model=args.model, dtype=args.dtype, device=args.device, quantization=args.quantization,
                          quantization_group_size=args.quantization_group_size,
                          cpu_activations=getattr(args, "cpu_activations", "auto")),
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens, mode=args.mode,
            min_admit_batch=args.min_admit_batch, async_depth=args.async_depth,
        ),
        parallel=ParallelConfig(
            tensor_parallel_size=args.tensor_parallel_size, pipeline_parallel_size=args.pipeline_parallel_size,
            expert_parallel_size=args.expert_parallel_size, pipeline_micro_batches=args.pipeline_micro_batches,
        ),
        cost=_cost_config(args),
    )
    world = config.parallel.world_size
    if world > 1 and resolve_device(args.device).type == "cuda" and world > torch.cuda.device_count():
        raise ValueError(f"tensor_parallel_size x pipeline_parallel_size = {world} needs {world} GPUs, "
                         f"this machine has {torch.cuda.device_count()}")
    return config


def _cost_config(args: argparse.Namespace) -> CostConfig:
    """`--price-per-hour` per device: each GPU on cuda; on CPU each rank counts as one device (as the aggregate
    cost of `throughput` always counted it)."""
    price = getattr(args, "price_per_hour", None)
    if price is None:
        return CostConfig()
    if resolve_device(args.device).type == "cuda":
        return CostConfig(gpu_hour_usd=price, gpus_per_rank=1)
    return CostConfig(cpu_hour_usd=price, cpus_per_rank=1)


def _per_million(cost_usd: float | None, num_tokens: int) -> float | None:
    return None if cost_usd is None or not num_tokens else cost_usd / num_tokens * 1e6


def _engine(args: argparse.Namespace) -> LLMEngine:
    """The engine of the flags; BenchConfigError (field and range) for a bad parallel layout,
    before any worker process starts."""
    try:
        config = engine_config(args)
    except ValueError as exc:
        raise BenchConfigError(str(exc)) from exc
    if config.parallel.world_size == 1:
        return LLMEngine(config)
    device = resolve_device(config.model.device)
    dtype = resolve_dtype(config.model.dtype, device)
    loaded = load_model(config.model, device, dtype, weights=False)
    try:  # every rank's shard on the meta device: a size the model cannot be split by fails here
        rank_bytes(config, loaded.hf_config, dtype)
    except ValueError as exc:
        raise BenchConfigError(f"{loaded.name} cannot be split as {parallel_label(config)}: {exc}") from exc
    return LLMEngine(config, loaded=loaded)


def parallel_label(config: EngineConfig) -> str:
    """e.g. `TP 2`, `TP 2 x PP 2`, `TP 2 EP 2`; `1 device` for a world of one."""
    par = config.parallel
    if par.world_size == 1:
        return "1 device"
    parts = [f"{name} {size}" for name, size in (("TP", par.tensor_parallel_size), ("PP", par.pipeline_parallel_size))
             if size > 1]
    label = " x ".join(parts)
    if par.expert_parallel_size > 1:
        label += f" EP {par.expert_parallel_size}"
    return label


def _parallel_json(config: EngineConfig) -> dict:
    par = config.parallel
    return {"tensor_parallel_size": par.tensor_parallel_size, "pipeline_parallel_size": par.pipeline_parallel_size,
            "expert_parallel_size": par.expert_parallel_size,
            "pipeline_micro_batches": par.pipeline_depth if par.pipeline_parallel_size > 1 else None,
            "world_size": par.world_size, "label": parallel_label(config)}


def _describe(config: EngineConfig) -> str:
    par = config.parallel
    micro = f", pipeline_micro_batches {par.pipeline_depth}" if par.pipeline_parallel_size > 1 else ""
    return (f"{parallel_label(config)}; {par.world_size} worker processes (tensor_parallel_size "
            f"{par.tensor_parallel_size}, pipeline_parallel_size {par.pipeline_parallel_size}, "
            f"expert_parallel_size {par.expert_parallel_size}{micro})")


def _hf(engine: LLMEngine, args: argparse.Namespace):
    if engine.config.parallel.world_size > 1:
        engine.shutdown()  # measurements are done: free the ranks' devices for the one-device baseline
    return load_hf_model(engine.config.model, engine.loaded, engine.loaded.device, engine.loaded.dtype)


def _free(model) -> None:
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_latency_bench(args: argparse.Namespace) -> dict:
    if getattr(args, "speculative_method", None):
        try:
            config, _ = engine_config(args), speculative_config(args)
        except ValueError as exc:
            raise BenchConfigError(str(exc)) from exc
        try:
            return run_speculative_bench(config, args)
        except SpecStartupError as exc:
            raise BenchConfigError(str(exc)) from exc
    engine = _engine(args)
    try:
        return _latency(engine, args)
    finally:
        engine.shutdown()


def _latency(engine: LLMEngine, args: argparse.Namespace) -> dict:
    config = engine.config
    world, label = config.parallel.world_size, parallel_label(config)
    device = engine.loaded.device
    vocab_size = engine.loaded.hf_config.vocab_size
    bandwidth = copy_bandwidth(device)
    if world > 1 and device.type == "cuda":
        torch.cuda.empty_cache()  # this process shares device 0 with rank 0
    name = device_name(device)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    # Warm-up: first steps pay allocator and kernel-selection costs.
    run_engine(engine, Workload(2, args.input_len, 8, seed=99).sample(vocab_size))
    rows = []
    for batch_size in batch_sizes:
        requests = Workload(batch_size, args.input_len, args.output_len, seed=batch_size).sample(vocab_size)
        ours = run_latency(engine, requests, bandwidth)
        rows.append({"ours": asdict(ours), "requests": requests,
                     "rank_lines": [r.line() for r in getattr(ours, "ranks", ())]})
    hf_model = None if args.no_hf else _hf(engine, args)
    if world == 1:
        print(f"device: {name}; copy bandwidth {bandwidth / 1e9:.1f} GB/s; model {engine.loaded.name}")
        print(f"{'batch':>5} {'step ms':>8} {'host ms':>8} {'GPU ms':>7} {'dec tok/s':>9} {'GB/s':>8} {'of copy':>7} "
              f"{'HF tok/s':>9} {'ratio':>6}")
    else:
        print(f"device: {name} x {world} ranks; copy bandwidth {bandwidth / 1e9:.1f} GB/s (one device); "
              f"model {engine.loaded.name}")
        print(f"parallel: {_describe(config)}")
        print(f"step time: driver wall clock ({label}); wall ms = median engine.step() on the driver; "
              "host / GPU ms = the slowest rank's medians (each rank's below the table)")
        print("GB/s: per GPU = bytes one GPU of each pipeline stage reads per step (its shard's weights + KV), "
              "summed over the stages, / step time")
        if hf_model is not None:
            print(f"HF: transformers generate on one device ({device}) with the whole model (the single-device baseline)")
        print(f"{'batch':>5} {'step ms':>8} {'wall ms':>8} {'host ms':>8} {'GPU ms':>7} {'dec tok/s':>9} {'GB/s':>8} "
              f"{'of copy':>7} {'HF tok/s':>9} {'ratio':>6}")
    results = []
    for row in rows:
        ours = row["ours"]
        per_million = _per_million(ours["cost_usd"], len(row["requests"]) * args.output_len)
        hf_tps = None
        if hf_model is not None:
            requests = row["requests"]
            hf_generate(hf_model, requests[:1], len(requests), device)  # warm-up
            seconds, useful = hf_generate(hf_model, requests, len(requests), device)
            hf_tps = useful / seconds
        ratio = ours["tokens_per_s"] / hf_tps if hf_tps else None
        timing = f"{ours['host_ms_per_step']:>8.3f} {ours['gpu_ms_per_step']:>7.2f}"
        if world > 1:
            timing = f"{ours['wall_ms_per_step']:>8.2f} {timing}"
        print(
            f"{ours['batch_size']:>5} {ours['step_time_s'] * 1e3:>8.2f} {timing} {ours['decode_tokens_per_s']:>9.1f} "
            f"{ours['achieved_bandwidth'] / 1e9:>8.1f} {ours['achieved_bandwidth'] / bandwidth:>7.0%} "
            f"{hf_tps or float('nan'):>9.1f} {ratio or float('nan'):>6.2f}"
            + (f" {per_million:>9.3f} $/1M" if per_million is not None else "")
        )
        results.append({**ours, "hf_tokens_per_s": hf_tps, "ratio_vs_hf": ratio,
                        "measured_cost_per_million_output_tokens": per_million})
    if engine.cost.usd_per_hour is not None:
        print(f"$/1M: measured cost per million output tokens at ${args.price_per_hour}/h per device "
              f"(${engine.cost.usd_per_hour:g}/h for the engine; each request's share, workers/cost.py)")
    for row in rows:
        for line in row["rank_lines"]:
            print(f"  batch {row['ours']['batch_size']} {line}")
    result = {"device": name, "copy_bandwidth": bandwidth, "model": engine.loaded.name, "results": results}
    if world > 1:
        result.update(parallel=_parallel_json(config), step_timing="driver wall clock",
                      bytes_per_step_convention="per GPU: one GPU of each pipeline stage, summed over the stages")
    return result


def run_throughput_bench(args: argparse.Namespace) -> dict:
    engine = _engine(args)
    try:
        return _throughput(engine, args)
    finally:
        engine.shutdown()


def _throughput(engine: LLMEngine, args: argparse.Namespace) -> dict:
    world = engine.config.parallel.world_size
    device = engine.loaded.device
    vocab_size = engine.loaded.hf_config.vocab_size
    name = device_name(device)
    workload = Workload(
        args.num_requests, args.input_len, args.output_len, args.distribution, args.sigma,
        max_len=engine.max_model_len // 2, seed=args.seed,
    )
    requests = workload.sample(vocab_size)
    run_engine(engine, Workload(4, 16, 8, seed=99).sample(vocab_size))  # warm-up
    before = engine.stats().cost
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
    cost = ours.cost_per_million_tokens(args.price_per_hour, num_devices=world)
    price = f"${args.price_per_hour}/h" if world == 1 else f"${args.price_per_hour}/h x {world} devices"
    print(f"device: {name}{'' if world == 1 else f' x {world} ranks'}; model {engine.loaded.name}; "
          f"{ours.num_requests} requests "
          f"({args.distribution}, in {args.input_len} / out {args.output_len}), mode {args.mode}")
    if world > 1:
        print(f"parallel: {_describe(engine.config)}; most batches in flight {stats.max_batches_in_flight}")
    print(f"ours: {ours.output_tokens_per_s:.1f} output tok/s, {ours.requests_per_s:.2f} req/s, "
          f"TTFT mean {ours.mean_ttft_s * 1e3:.0f} ms p99 {ours.p99_ttft_s * 1e3:.0f} ms, "
          f"TPOT mean {ours.mean_tpot_s * 1e3:.1f} ms p99 {ours.p99_tpot_s * 1e3:.1f} ms, "
          f"${cost:.3f} per 1M output tokens at {price}; preemptions {stats.num_preemptions}")
    measured = _per_million(ours.cost_usd, ours.output_tokens)
    busy_usd = None if stats.cost is None else stats.cost.cost_usd_total - before.cost_usd_total
    if measured is not None:
        print(f"measured (each request's share of busy time x price, workers/cost.py): ${measured:.3f} per 1M "
              f"output tokens; the {ours.num_requests} requests' costs ${ours.cost_usd:.6f} = "
              f"{ours.cost_usd / busy_usd:.2%} of busy time x price (${busy_usd:.6f}), "
              f"{measured / cost:.2%} of the aggregate")
    if hf_tps is not None:
        one_device = "" if world == 1 else f" on one device ({device}), whole model"
        print(f"transformers generate (padded static batches of {args.hf_batch_size}){one_device}: "
              f"{hf_tps:.1f} output tok/s")
        print(f"ratio ours / transformers: {ours.output_tokens_per_s / hf_tps:.2f}x")
    result = {
        "device": name, "model": engine.loaded.name, "workload": asdict(workload), "ours": asdict(ours),
        "cost_per_million_output_tokens": cost, "measured_cost_per_million_output_tokens": measured,
        "busy_cost_usd": busy_usd, "hf_output_tokens_per_s": hf_tps,
        "ratio_vs_hf": None if hf_tps is None else ours.output_tokens_per_s / hf_tps,
        "timestamp": time.time(),
    }
    if world > 1:
        result["parallel"] = _parallel_json(engine.config)
    return result

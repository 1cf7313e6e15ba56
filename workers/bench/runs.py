"""Latency and throughput benchmarks of our engine beside transformers, in one process.

latency: for each batch size B, B requests of `input_len` tokens each generate exactly
  `output_len` tokens; decode step time is measured between the first and last token of the
  batch, so prefill does not blur it. Bytes a decode step must read (all weights + the KV
  cache of every context) over the step time gives the achieved bandwidth, compared with the
  copy bandwidth measured in the same run.
throughput: N requests from a seeded workload are queued at once (offline); output tokens/s,
  requests/s, TTFT and time per output token from each request's own metrics, and cost per
  million output tokens at a price per device-hour.
Both run `transformers.generate` on the same prompts in the same process and print the ratio.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from shardserve.workers.bench.workload import BenchRequest
from shardserve.workers.engine import LLMEngine
from shardserve.workers.request import SamplingParams


def _sync(engine: LLMEngine) -> None:
    if engine.config.parallel.world_size > 1:
        return  # worker processes: a step returns only after the output rank has its tokens on the host
    if engine.runner.device.type == "cuda":
        torch.cuda.synchronize(engine.runner.device)


def run_engine(engine: LLMEngine, requests: list[BenchRequest], step_walls: list[float] | None = None) -> list:
    """Queue every request at once and step until all finish; returns the final RequestOutputs.
    `step_walls` (optional) receives each engine.step()'s wall time."""
    for i, r in enumerate(requests):
        params = SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True, final_only=True)
        engine.add_request(f"bench-{i}", r.prompt_token_ids, params)
    finals = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        finals.extend(out for out in engine.step() if out.finished)
        if step_walls is not None:
            step_walls.append(time.perf_counter() - start)
    _sync(engine)
    return finals


@dataclass(frozen=True)
class LatencyResult:
    batch_size: int
    step_time_s: float  # median-free mean decode step time over the run
    tokens_per_s: float  # output tokens/s over the whole run (prefill included)
    decode_tokens_per_s: float
    bytes_per_step: int
    achieved_bandwidth: float  # bytes/s
    # Medians over decode steps: host = engine.step() wall time minus the wait for the GPU
    # (scheduler, input prep, launches, output processing); gpu = CUDA-event time of the step.
    host_ms_per_step: float
    gpu_ms_per_step: float
    graph_steps: int
    eager_steps: int


def decode_bytes_per_step(engine: LLMEngine, batch_size: int, mean_context: float) -> int:
    """Bytes a decode step reads: every weight once (the embedding only its looked-up rows),
    plus K and V of every cached token of every request."""
    model = engine.runner.model
    # Parameters are counted once, so a tied embedding / LM head is one full read (the head's).
    # An untied input embedding is read only at B rows: leave it out.
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if not engine.loaded.hf_config.tie_word_embeddings:
        embed = model.model.embed_tokens.weight
        weight_bytes -= embed.numel() * embed.element_size()
    kv_bytes_per_token = engine.runner.kv_bytes_per_token
    return int(weight_bytes + batch_size * mean_context * kv_bytes_per_token)


def run_latency(engine: LLMEngine, requests: list[BenchRequest], bandwidth: float) -> LatencyResult:
    batch_size = len(requests)
    output_len = requests[0].output_len
    times = engine.runner.step_times
    times.clear()
    times.enabled = True
    walls: list[float] = []
    start = time.perf_counter()
    finals = run_engine(engine, requests, walls)
    elapsed = time.perf_counter() - start
    times.enabled = False
    decode = slice(1, None)  # the first step is the prefill
    hosts = [w - t for w, t in zip(walls[decode], times.wait_s[decode], strict=False)] if times.wait_s else []
    first = max(f.metrics.first_token_time for f in finals)
    last = max(f.metrics.last_token_time for f in finals)
    num_decode_steps = max(output_len - 1, 1)
    step_time = (last - first) / num_decode_steps
    mean_context = len(requests[0].prompt_token_ids) + output_len / 2
    num_bytes = decode_bytes_per_step(engine, batch_size, mean_context)
    return LatencyResult(
        batch_size=batch_size,
        step_time_s=step_time,
        tokens_per_s=batch_size * output_len / elapsed,
        decode_tokens_per_s=batch_size / step_time,
        bytes_per_step=num_bytes,
        achieved_bandwidth=num_bytes / step_time,
        host_ms_per_step=statistics.median(hosts) * 1e3 if hosts else float("nan"),
        gpu_ms_per_step=statistics.median(times.gpu_s[decode]) * 1e3 if times.gpu_s[decode] else float("nan"),
        graph_steps=times.graph_steps,
        eager_steps=times.eager_steps,
    )


@dataclass(frozen=True)
class ThroughputResult:
    num_requests: int
    elapsed_s: float
    output_tokens: int
    output_tokens_per_s: float
    requests_per_s: float
    mean_ttft_s: float
    p99_ttft_s: float
    mean_tpot_s: float
    p99_tpot_s: float

    def cost_per_million_tokens(self, price_per_hour: float, num_devices: int = 1) -> float:
        return price_per_hour * num_devices / 3600 / self.output_tokens_per_s * 1e6


def _p99(values: list[float]) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(0.99 * (len(values) - 1))))]


def run_throughput(engine: LLMEngine, requests: list[BenchRequest],
                   step_walls: list[float] | None = None) -> ThroughputResult:
    start = time.perf_counter()
    finals = run_engine(engine, requests, step_walls)
    elapsed = time.perf_counter() - start
    output_tokens = sum(len(f.outputs[0].token_ids) for f in finals)
    ttfts = [f.metrics.ttft for f in finals]
    tpots = [
        (f.metrics.last_token_time - f.metrics.first_token_time) / (f.metrics.num_generation_tokens - 1)
        for f in finals
        if f.metrics.num_generation_tokens > 1
    ] or [0.0]
    return ThroughputResult(
        num_requests=len(finals),
        elapsed_s=elapsed,
        output_tokens=output_tokens,
        output_tokens_per_s=output_tokens / elapsed,
        requests_per_s=len(finals) / elapsed,
        mean_ttft_s=statistics.fmean(ttfts),
        p99_ttft_s=_p99(ttfts),
        mean_tpot_s=statistics.fmean(tpots),
        p99_tpot_s=_p99(tpots),
    )

"""Latency and throughput benchmarks of our engine beside transformers, in one process.

latency: for each batch size B, B requests of `input_len` tokens each generate exactly
  `output_len` tokens; decode step time is measured between the first and last token of the
  batch, so prefill does not blur it. Bytes a decode step must read (all weights + the KV
  cache of every context) over the step time gives the achieved bandwidth, compared with the
  copy bandwidth measured in the same run.
throughput: N requests from a seeded workload are queued at once (offline); output tokens/s,
  requests/s, TTFT and time per output token from each request's own metrics, and cost per
  million output tokens at a price per device-hour: aggregate (elapsed x price / tokens) and
  measured (the sum of the requests' own costs, workers/cost.py, when the engine is priced).
Both run `transformers.generate` on the same prompts in the same process and print the ratio.

Worker groups (world = TP x PP > 1): the model runs in the rank processes, so the per-step host /
GPU split is recorded on the ranks and `run_latency` asks each for its medians (a
RankTimingProbe, bench/rank_timing.py) next to the driver's own step wall time
(`_run_latency_worker_group`); bytes per step are computed per GPU from shards built on the
meta device (`rank_bytes`, `decode_bytes_per_step`). The step time itself is driver wall clock
at any world size; at batch 1 decode tok/s is 1 / time per output token.
"""

from __future__ import annotations

import statistics
import time
import weakref
from dataclasses import dataclass

import torch
from shardserve.parallel.state import (
    GroupInfo,
    ParallelState,
    get_parallel_state,
    group_layout,
    set_parallel_state,
)
from shardserve.workers.bench.rank_timing import RankTiming, time_ranks
from shardserve.workers.bench.workload import BenchRequest
from shardserve.workers.config import EngineConfig
from shardserve.workers.engine import LLMEngine
from shardserve.workers.models.registry import model_class_for
from shardserve.workers.request import SamplingParams
from shardserve.workers.runner.kv_budget import KVCacheLayout


def _sync(engine: LLMEngine) -> None:
    runner = getattr(engine.executor, "runner", None)  # only the in-process executor has one
    if runner is None:
        return  # worker processes: a step returns only after the output rank has its tokens on the host
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)


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
    cost_usd: float | None  # the requests' measured costs summed (workers/cost.py); None when unpriced


@dataclass(frozen=True)
class WorkerGroupLatencyResult(LatencyResult):
    """A LatencyResult of a worker group (world > 1): host_ms_per_step, gpu_ms_per_step and the
    step counts are the slowest rank's (each rank's in `ranks`; a rank that samples nothing, a
    pipeline stage before the last, records no steps); bytes_per_step and achieved_bandwidth
    are per GPU (module docstring)."""

    # median engine.step() wall time on the driver over the decode steps (under PP one step
    # applies one micro-batch, so with several in flight it is shorter than step_time_s)
    wall_ms_per_step: float
    world_size: int
    ranks: tuple[RankTiming, ...] = ()


@dataclass(frozen=True)
class RankBytes:
    """What one rank holds: bytes of the weights a decode step reads, KV bytes per cached token."""

    rank: int
    pp_rank: int
    weight_bytes: int
    kv_bytes_per_token: int


def _rank_state(config: EngineConfig, rank: int) -> ParallelState:
    """The ParallelState `init_parallel` would install on `rank`, with placeholder groups (no
    torch.distributed): enough for the layers to size their shards."""
    par = config.parallel
    layout = group_layout(par.world_size, par.tensor_parallel_size, par.pipeline_parallel_size,
                          par.expert_parallel_size)

    def info(kind: str) -> GroupInfo:
        ranks = next(r for r in layout[kind] if rank in r)
        return GroupInfo(rank=ranks.index(rank), size=len(ranks), group=object() if len(ranks) > 1 else None,
                         ranks=ranks)

    return ParallelState(tp=info("tp"), pp=info("pp"), ep=info("ep"), rank=rank, world_size=par.world_size,
                         pp_layer_partition=par.pipeline_layer_partition, expert_dispatch=par.expert_dispatch,
                         all_to_all_min_tokens=par.all_to_all_min_tokens)


def rank_bytes(config: EngineConfig, hf_config, dtype: torch.dtype) -> list[RankBytes]:
    """Every rank's decode bytes, from the model config: each rank's shard is built on the meta
    device under its ParallelState. A weight counts once (parameters are deduplicated); an
    embedding table counts only where it is also the LM head (tied), since a lookup reads just
    B rows.

    Each rank's shard is built on the meta device under that rank's ParallelState (no memory, same
    shapes as its weights and KV cache; the counting rules of world 1: each weight read once per
    step, an untied input embedding not at all). A decode step visits the P stages one after
    another, so the bytes per step are what one GPU of each stage reads (the stage's busiest TP
    rank: weights / TP plus the KV of its own heads and layers), summed over the stages: over the
    step time, the bandwidth a GPU sustains while it holds the step, comparable with one device's
    copy bandwidth (PP micro-batches that overlap stages are not credited, so PP at batch > 1 reads
    low).
    """
    cls = model_class_for(hf_config)
    previous = get_parallel_state()
    out = []
    try:
        for rank in range(config.parallel.world_size):
            state = _rank_state(config, rank)
            set_parallel_state(state)
            with torch.device("meta"):
                model = cls(hf_config, params_dtype=dtype)
            weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            embed = model.model.embed_tokens
            head = getattr(model, "lm_head", None)
            if embed is not None and (head is None or head.weight is not embed.weight):
                weight_bytes -= embed.weight.numel() * embed.weight.element_size()
            kv = KVCacheLayout.of_model(model, config.cache.block_size).bytes_per_block // config.cache.block_size
            out.append(RankBytes(rank, state.pp_rank, weight_bytes, kv))
    finally:
        set_parallel_state(previous)
    return out


_RANK_BYTES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _worker_group_bytes(engine: LLMEngine, batch_size: int, mean_context: float) -> int:
    """Per-GPU bytes of a decode step of a worker group: the busiest rank of each pipeline
    stage, summed over the stages (module docstring)."""
    ranks = _RANK_BYTES.get(engine)
    if ranks is None:
        ranks = _RANK_BYTES[engine] = rank_bytes(engine.config, engine.loaded.hf_config, engine.loaded.dtype)
    per_stage: dict[int, float] = {}
    for r in ranks:
        num_bytes = r.weight_bytes + batch_size * mean_context * r.kv_bytes_per_token
        per_stage[r.pp_rank] = max(per_stage.get(r.pp_rank, 0.0), num_bytes)
    return int(sum(per_stage.values()))


def decode_bytes_per_step(engine: LLMEngine, batch_size: int, mean_context: float) -> int:
    """Bytes a decode step reads: every weight once (the embedding only its looked-up rows),
    plus K and V of every cached token of every request. Worker groups: per GPU, summed over the
    pipeline stages (module docstring)."""
    if engine.config.parallel.world_size > 1:
        return _worker_group_bytes(engine, batch_size, mean_context)
    model = engine.runner.model
    # Parameters are counted once, so a tied embedding / LM head is one full read (the head's).
    # An untied input embedding is read only at B rows: leave it out.
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = getattr(model.model.embed_tokens, "weight", None)  # None: a GGUF table kept packed (no parameter)
    if not engine.loaded.hf_config.tie_word_embeddings and embed is not None:
        weight_bytes -= embed.numel() * embed.element_size()
    kv_bytes_per_token = engine.runner.kv_bytes_per_token
    return int(weight_bytes + batch_size * mean_context * kv_bytes_per_token)


def run_latency(engine: LLMEngine, requests: list[BenchRequest], bandwidth: float) -> LatencyResult:
    if engine.config.parallel.world_size > 1:
        return _run_latency_worker_group(engine, requests)
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
    return LatencyResult(
        **_decode_figures(engine, requests, finals, elapsed),
        host_ms_per_step=statistics.median(hosts) * 1e3 if hosts else float("nan"),
        gpu_ms_per_step=statistics.median(times.gpu_s[decode]) * 1e3 if times.gpu_s[decode] else float("nan"),
        graph_steps=times.graph_steps,
        eager_steps=times.eager_steps,
    )


def _decode_figures(engine: LLMEngine, requests: list[BenchRequest], finals: list, elapsed: float) -> dict:
    """The LatencyResult fields every world size shares: step time from the token timestamps
    (first to last token over the decode steps), tokens/s and bytes / bandwidth per step."""
    batch_size, output_len = len(requests), requests[0].output_len
    first = max(f.metrics.first_token_time for f in finals)
    last = max(f.metrics.last_token_time for f in finals)
    step_time = (last - first) / max(output_len - 1, 1)
    mean_context = len(requests[0].prompt_token_ids) + output_len / 2
    num_bytes = decode_bytes_per_step(engine, batch_size, mean_context)
    return {"batch_size": batch_size, "step_time_s": step_time, "tokens_per_s": batch_size * output_len / elapsed,
            "decode_tokens_per_s": batch_size / step_time, "bytes_per_step": num_bytes,
            "achieved_bandwidth": num_bytes / step_time, "cost_usd": requests_cost_usd(engine, finals)}


def requests_cost_usd(engine: LLMEngine, finals: list) -> float | None:
    """What the finished requests were charged (RequestMetrics.cost_usd); None when the engine has no price."""
    return None if engine.cost.usd_per_hour is None else sum(f.metrics.cost_usd for f in finals)


def _run_latency_worker_group(engine: LLMEngine, requests: list[BenchRequest]) -> WorkerGroupLatencyResult:
    """run_latency of a worker group: the same figures from the driver's wall clock (module docstring).

    Returns each rank's RankTiming (`ranks`), host and GPU ms of the slowest rank (GPU ms NaN on CPU:
    no events), and the driver's median engine.step() wall time over the decode steps
    (`wall_ms_per_step`).
    """
    walls: list[float] = []
    start = time.perf_counter()
    finals, ranks = time_ranks(engine.executor.call, lambda: run_engine(engine, requests, walls))
    elapsed = time.perf_counter() - start
    decode_walls = walls[1:] or walls  # the first step is the prefill
    timed = [r for r in ranks if r.steps > 0]
    return WorkerGroupLatencyResult(
        **_decode_figures(engine, requests, finals, elapsed),
        host_ms_per_step=max((r.host_ms for r in timed), default=float("nan")),
        gpu_ms_per_step=max((r.gpu_ms for r in timed), default=float("nan")),
        graph_steps=max((r.graph_steps for r in timed), default=0),
        eager_steps=max((r.eager_steps for r in timed), default=0),
        wall_ms_per_step=statistics.median(decode_walls) * 1e3,
        world_size=engine.config.parallel.world_size,
        ranks=tuple(ranks),
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
    cost_usd: float | None = None  # the requests' measured costs summed (workers/cost.py); None when unpriced

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
        cost_usd=requests_cost_usd(engine, finals),
    )

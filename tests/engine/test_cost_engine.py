"""Cost per request on the real engine (embedded SmolLM2 on CPU): the per-request costs of a run add up to
the engine's busy wall time x devices x price, and to the run's own wall clock within 1 %."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
from shardserve.workers.config import CostConfig, EngineConfig, ModelConfig, SchedulerConfig
from shardserve.workers.engine import LLMEngine
from shardserve.workers.llm import LLM
from shardserve.workers.request import SamplingParams

USD_PER_CPU_HOUR = 3600.0  # $1 per CPU-second: costs read as seconds
PROMPTS = ["Hi", "Count: one two three four", "The quick brown fox jumps over the lazy dog. " * 5]
MAX_TOKENS = [2, 4, 6]  # longer prompts ask for more tokens: each request does more work than the one before


def _params() -> list[SamplingParams]:
    return [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in MAX_TOKENS]


def _run(engine: LLMEngine, prompts: list[str], params: list[SamplingParams]) -> tuple[list, float]:
    """Add every request, step to the end; the final outputs in order and the wall time it took."""
    start = time.monotonic()
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(str(i), prompt, p)
    finals = {}
    while engine.has_unfinished_requests():
        finals.update({out.request_id: out for out in engine.step() if out.finished})
    return [finals[str(i)] for i in range(len(prompts))], time.monotonic() - start


def _config(**scheduler) -> EngineConfig:
    return EngineConfig(model=ModelConfig(model="default", dtype="float32", device="cpu"),
                        scheduler=replace(SchedulerConfig(), **scheduler),
                        cost=CostConfig(cpu_hour_usd=USD_PER_CPU_HOUR, cpus_per_rank=2))


def _check_adds_up(costs: list[float], stats, wall_s: float, usd_per_hour: float) -> None:
    assert stats.usd_per_hour == usd_per_hour and stats.unattributed_usd == 0
    assert sum(costs) == pytest.approx(stats.busy_s * usd_per_hour / 3600, rel=1e-9)
    assert sum(costs) == pytest.approx(wall_s * usd_per_hour / 3600, rel=0.01), (costs, wall_s)
    assert costs[0] < costs[1] < costs[2], costs  # more tokens in and out cost more


def test_offline_llm_request_costs_add_up_to_busy_time_x_price():
    """The offline API (async scheduling, the default): three lengths and one request of n = 2."""
    llm = LLM("default", dtype="float32", device="cpu", cpu_hour_usd=USD_PER_CPU_HOUR, cpus_per_rank=2)
    params = [*_params(), SamplingParams(n=2, max_tokens=3, temperature=0.8, seed=1, ignore_eos=True)]
    start = time.monotonic()
    outs = llm.generate([*PROMPTS, "Once upon a time"], params)
    wall_s = time.monotonic() - start
    stats = llm.engine.stats().cost
    _check_adds_up([out.metrics.cost_usd for out in outs], stats, wall_s, 2 * USD_PER_CPU_HOUR)
    assert len(outs[3].outputs) == 2 and outs[3].metrics.cost_usd > 0  # both samples land on the request
    assert stats.num_output_tokens == sum(MAX_TOKENS) + 2 * 3
    assert stats.cost_per_million_output_tokens_usd == pytest.approx(sum(o.metrics.cost_usd for o in outs)
                                                                     / stats.num_output_tokens * 1e6)


def test_sync_engine_costs_add_up_and_no_price_means_no_cost(smollm2_loaded):
    engine = LLMEngine(_config(async_scheduling=False), loaded=smollm2_loaded)
    outs, wall_s = _run(engine, PROMPTS, _params())
    _check_adds_up([out.metrics.cost_usd for out in outs], engine.stats().cost, wall_s, 2 * USD_PER_CPU_HOUR)
    unpriced = LLMEngine(EngineConfig(model=ModelConfig(model="default", dtype="float32", device="cpu")),
                         loaded=smollm2_loaded)
    (out,), _ = _run(unpriced, ["Hi"], [SamplingParams(max_tokens=2)])
    assert out.metrics.cost_usd == 0.0 and unpriced.stats().cost is None


def test_a_gpu_price_on_a_cpu_engine_is_refused_before_loading():
    with pytest.raises(ValueError, match="cost.gpu_hour_usd is set but this engine has no GPUs"):
        LLM("default", device="cpu", gpu_hour_usd=2.5)
    with pytest.raises(ValueError, match="cpu_hour_usd must be >= 0 USD per CPU-hour, got -1"):
        LLM("default", device="cpu", cpu_hour_usd=-1)

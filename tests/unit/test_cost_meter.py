"""CostMeter's arithmetic on a clock the test drives: intervals tile busy time (overlapping batches counted
once, idle gaps not at all), shares follow the fitted token weights, and the fit recovers known costs."""

from __future__ import annotations

import pytest
from shardserve.workers.config import CostConfig
from shardserve.workers.cost import CostMeter, StepTimeFit, usd_per_hour
from shardserve.workers.request import Request, RequestMetrics, SamplingParams
from shardserve.workers.step_types import ScheduledRequest


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Requests:
    """The engine's OutputProcessor.billing, over requests the test makes (gone = left already)."""

    def __init__(self) -> None:
        self.live: dict[str, Request] = {}

    def add(self, request_id: str, num_prompt: int, scheduled_at: float) -> Request:
        request = Request(request_id, list(range(num_prompt)), SamplingParams())
        request.metrics.first_scheduled_time = scheduled_at
        self.live[request_id] = request
        return request

    def billing(self, sample_id: str) -> tuple[Request, RequestMetrics] | None:
        request = self.live.get(sample_id)
        return None if request is None else (request, request.metrics)


def row(request_id: str, start: int, num_tokens: int, sample: bool = True) -> ScheduledRequest:
    return ScheduledRequest(request_id, tuple(range(num_tokens)), start, (), sample)


def test_intervals_tile_busy_time_and_skip_idle_gaps():
    clock, requests = Clock(), Requests()
    meter = CostMeter(usd_per_hour=3600.0, clock=clock)  # $1 per busy second
    a = requests.add("a", num_prompt=4, scheduled_at=1.0)
    clock.now = 1.5  # batch 1 (a's prompt) applied: busy since its schedule at 1.0
    meter.record([row("a", 0, 4)], requests)
    clock.now = 1.75  # batch 2, launched behind batch 1 (async): only the time since batch 1 counts
    meter.record([row("a", 4, 1)], requests)
    b = requests.add("b", num_prompt=2, scheduled_at=5.0)  # the engine was idle from 1.75 to 5.0
    clock.now = 5.5
    meter.record([row("b", 0, 2)], requests)
    meter.record([], requests)  # an empty schedule ran nothing: no time, no charge
    assert meter.busy_s == pytest.approx(0.5 + 0.25 + 0.5)
    assert a.metrics.cost_usd == pytest.approx(0.75) and b.metrics.cost_usd == pytest.approx(0.5)
    del requests.live["a"]  # a left (aborted) while its last batch was in flight
    clock.now = 6.0
    meter.record([row("a", 5, 1)], requests)
    stats = meter.stats()
    assert stats.unattributed_usd == pytest.approx(0.5) and stats.busy_s == pytest.approx(1.75)
    assert stats.cost_usd_total == pytest.approx(a.metrics.cost_usd + b.metrics.cost_usd + 0.5)
    assert stats.num_tokens == 7 and stats.num_output_tokens == 3


def test_shares_follow_the_token_weights():
    clock, requests = Clock(), Requests()
    fit = StepTimeFit()
    fit.weights = (2.0, 1.0)  # a prefill token costs two decode tokens
    meter = CostMeter(usd_per_hour=3600.0, clock=clock, fit=fit)
    long, short = requests.add("long", 10, 0.0), requests.add("short", 3, 0.0)
    clock.now = 2.6
    # long: prefill positions 6..9 (4 tokens, weight 8); short: a decode token (weight 1) + nothing else
    meter.record([row("long", 6, 4), row("short", 3, 1)], requests)
    assert long.metrics.cost_usd == pytest.approx(2.6 * 8 / 9)
    assert short.metrics.cost_usd == pytest.approx(2.6 * 1 / 9)


def test_fit_recovers_prefill_and_decode_costs_and_falls_back():
    fit = StepTimeFit(window=64, refit_every=8, min_batches=16)
    for i in range(40):  # interval = 5 ms + 0.2 ms per prefill token + 1 ms per decode token
        prefill, decode = (i * 37) % 300, 1 + (i * 11) % 16
        fit.add(prefill, decode, 0.005 + 0.0002 * prefill + 0.001 * decode)
    assert fit.weights == pytest.approx((0.0002, 0.001))
    flat = StepTimeFit(refit_every=1, min_batches=4)
    for _ in range(10):  # decode only: prefill's slope cannot be measured
        flat.add(0, 8, 0.02)
    assert flat.weights == (1.0, 1.0)


def test_price_of_the_worker_group():
    assert usd_per_hour(CostConfig(), 4, "cuda") is None
    assert usd_per_hour(CostConfig(gpu_hour_usd=2.0), 4, "cuda") == 8.0  # 4 ranks x 1 GPU
    assert usd_per_hour(CostConfig(gpu_hour_usd=2.0, cpu_hour_usd=0.1, gpus_per_rank=2, cpus_per_rank=8), 2,
                        "cuda") == pytest.approx(2 * (2 * 2.0 + 8 * 0.1))
    assert usd_per_hour(CostConfig(cpu_hour_usd=0.5, cpus_per_rank=4), 1, "cpu") == 2.0
    with pytest.raises(ValueError, match="cost.gpu_hour_usd is set but this engine has no GPUs"):
        usd_per_hour(CostConfig(gpu_hour_usd=2.0), 1, "cpu")


def test_yaml_refuses_a_negative_price_naming_the_field():
    from shardserve.cluster.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match=r"models\[0\]\.cost\.gpu_hour_usd: must be >= 0(\.0)?, got -2"):
        parse_config({"models": [{"name": "m", "cost": {"gpu_hour_usd": -2}}]})
    with pytest.raises(ConfigError, match=r"models\[0\]\.cost\.gpus_per_rank: unknown field"):  # from resources
        parse_config({"models": [{"name": "m", "cost": {"gpus_per_rank": 2}}]})
    section = parse_config({"models": [{"name": "m", "cost": {"gpu_hour_usd": 2.5},
                                        "resources": {"num_gpus_per_worker": 2, "num_cpus_per_worker": 4}}]}).models[0]
    cost = section.to_engine_config().cost
    assert (cost.gpu_hour_usd, cost.cpu_hour_usd, cost.gpus_per_rank, cost.cpus_per_rank) == (2.5, None, 2, 4)

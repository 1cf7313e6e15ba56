"""Per-rank step timing (workers/bench/rank_timing.py: a RankTimingProbe through Worker.probe_start/stop): a TP 2 engine on
CPU (gloo, spawned ranks) records every rank's host times over exactly the steps between the two
calls, with a step in flight at both ends (async scheduling); the device times need CUDA events,
so on CPU they are NaN, as is the graph-only prep time; the driver's turnaround is timed."""

from __future__ import annotations

import math

from shardserve.workers.bench.rank_timing import RankTiming, time_ranks
from shardserve.workers.config import EngineConfig, ModelConfig, ParallelConfig
from shardserve.workers.engine import LLMEngine
from shardserve.workers.request import SamplingParams


def test_tp2_ranks_time_the_steps_between_the_calls() -> None:
    config = EngineConfig(model=ModelConfig(model="dummy:tiny-llama", dtype="float32", device="cpu"),
                          parallel=ParallelConfig(tensor_parallel_size=2, collective_timeout_s=60.0,
                                                  step_timeout_s=60.0))
    engine = LLMEngine(config)
    try:
        engine.add_request("r", list(range(1, 20)), SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
        engine.step()
        engine.step()
        assert engine.stats().num_batches_in_flight == 1
        outputs, timings = time_ranks(engine.executor.call, lambda: [engine.step() for _ in range(4)])
        assert len(outputs) == 4  # run_steps' result comes back

        assert [t.rank for t in timings] == [0, 1]
        for t in timings:
            assert isinstance(t, RankTiming)
            assert t.steps == 4  # the steps submitted between the calls, each finished once
            assert 0 < t.launch_ms <= t.host_ms
            assert t.wait_ms >= 0
            assert math.isnan(t.gpu_ms) and math.isnan(t.gap_ms)  # no CUDA events on CPU
            # every step after the first waited on the driver's next message after a finish
            assert 0 < t.driver_ms <= t.driver_p90_ms
            assert t.launch_ms <= t.launch_p90_ms
            assert math.isnan(t.prep_ms)  # decode graphs only: none on CPU
            assert f"rank {t.rank}: 4 steps" in t.line()
        # Recording stopped: later steps leave the records alone.
        engine.step()
        _, again = time_ranks(engine.executor.call, lambda: None)
        assert [t.steps for t in again] == [0, 0]
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        engine.shutdown()

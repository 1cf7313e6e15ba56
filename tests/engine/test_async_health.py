"""AsyncEngine.health() answers while a step runs, and calls a step that outlasts step_timeout_s hung.

Serve's health check must not queue behind a step (a hung rank would otherwise make every check
time out, and the replica would wait for three of them). The real engine (SmolLM2, CPU) with one
step slowed down by the test: health() answers within about HEALTH_WAIT_S while that step runs,
healthy while the step is younger than parallel.step_timeout_s, dead once it is older.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from shardserve.workers.async_engine import HEALTH_WAIT_S, AsyncEngine
from shardserve.workers.config import EngineConfig, ModelConfig, ParallelConfig
from shardserve.workers.engine import LLMEngine
from shardserve.workers.protocol import EngineDeadError
from shardserve.workers.request import SamplingParams

pytestmark = pytest.mark.slow
SLOW_STEP_S = 4.0


def slowed_engine(loaded, step_timeout_s: float) -> AsyncEngine:
    config = EngineConfig(
        model=ModelConfig(model="default", dtype="float32", device="cpu", max_model_len=64),
        parallel=ParallelConfig(step_timeout_s=step_timeout_s),
    )
    engine = LLMEngine(config, loaded=loaded)
    step = engine.step
    slowed = []

    def slow_first_step():  # stands in for a step waiting on a hung rank
        if not slowed:
            slowed.append(True)
            time.sleep(SLOW_STEP_S)
        return step()

    engine.step = slow_first_step
    return AsyncEngine(engine)


async def health_during_slow_step(engine: AsyncEngine) -> tuple[BaseException | None, float]:
    async def consume() -> None:
        async for _ in engine.generate("Hello", SamplingParams(max_tokens=2), "slow"):
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(1.5)  # the slow step is running now
    start = time.monotonic()
    try:
        await engine.health()
        error = None
    except EngineDeadError as err:
        error = err
    elapsed = time.monotonic() - start
    await task
    return error, elapsed


@pytest.mark.parametrize(("step_timeout_s", "dead"), [(60.0, False), (1.0, True)])
def test_health_does_not_wait_behind_a_step(smollm2_loaded, step_timeout_s, dead):
    engine = slowed_engine(smollm2_loaded, step_timeout_s)
    try:
        error, elapsed = asyncio.run(health_during_slow_step(engine))
    finally:
        engine.shutdown()
    assert elapsed < HEALTH_WAIT_S + 1.5, f"health() waited {elapsed:.1f}s behind the step"
    if dead:
        assert error is not None and "parallel.step_timeout_s = 1" in str(error), error
    else:
        assert error is None, error

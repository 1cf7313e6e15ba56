"""A caller cancelled while its request is still queued for the engine thread (a client that goes
away at once, found by benchmarks/fuzz.py against the real engine) must not kill the engine: the
add runs, is aborted right after, and other requests keep being served."""

from __future__ import annotations

import asyncio
import contextlib

from shardserve.workers.async_engine import AsyncEngine
from shardserve.workers.config import EngineConfig, ModelConfig
from shardserve.workers.engine import LLMEngine
from shardserve.workers.request import SamplingParams


def test_cancel_while_the_add_is_queued_keeps_the_engine_alive(smollm2_loaded):
    config = EngineConfig(model=ModelConfig(model="default", dtype="float32", device="cpu", max_model_len=128))
    engine = AsyncEngine(LLMEngine(config, loaded=smollm2_loaded))

    async def complete(request_id: str, max_tokens: int) -> str:
        final = None
        async for out in engine.generate("Count to ten:", SamplingParams(temperature=0, max_tokens=max_tokens),
                                         request_id):  # fmt: skip
            final = out
        return final.outputs[0].finish_reason.value

    async def cancelled_at_once(request_id: str) -> None:
        task = asyncio.ensure_future(complete(request_id, 50))
        await asyncio.sleep(0)  # the add is submitted; the engine thread is busy stepping `busy`
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def main() -> None:
        busy = asyncio.ensure_future(complete("busy", 24))  # keeps the engine thread in steps
        await asyncio.sleep(0.2)
        for i in range(8):
            await cancelled_at_once(f"gone-{i}")
        assert await busy in ("length", "stop")
        assert await complete("after", 4) in ("length", "stop")
        await engine.health()  # raises EngineDeadError if the engine thread died
        for _ in range(50):  # the aborts of the cancelled adds have been applied
            stats = await engine.stats()
            if stats.num_running == 0 and stats.num_waiting == 0:
                break
            await asyncio.sleep(0.1)
        assert stats.num_running == 0 and stats.num_waiting == 0, stats

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()

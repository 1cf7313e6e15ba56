"""Callers that go away at any moment never take the engine down (issue 20, item 1).

The real engine (embedded SmolLM2, CPU) behind AsyncEngine, driven by many concurrent callers
that each stop at a random point: cancelled while the "add" command is still queued (the case
that used to kill the engine thread: it set a result on a future the caller had cancelled),
cancelled while waiting or decoding, leaving the iteration early, timing out with
`asyncio.wait_for`, calling `abort()` from the side, or running to the end. A small KV pool and
a small step budget make requests queue, prefill in chunks and get preempted meanwhile.
Afterwards the engine must be alive, idle, hold no KV block and no stream, and a greedy request
must give the same tokens as on a fresh engine.
"""

from __future__ import annotations

import asyncio
import random

import pytest
from shardserve.workers.async_engine import AsyncEngine
from shardserve.workers.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from shardserve.workers.engine import LLMEngine
from shardserve.workers.protocol import QueueFullError
from shardserve.workers.request import FinishReason, SamplingParams

pytestmark = pytest.mark.slow
NUM_CLIENTS = 120
PROBE = "The capital of France is"
MODES = ("cancel_at_once", "cancel_later", "break_early", "wait_for", "abort_call", "finish")


def engine_config() -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(model="default", dtype="float32", device="cpu", max_model_len=128),
        # 24 blocks of 16 tokens: a dozen requests fill it, so some are preempted and re-queued.
        cache=CacheConfig(block_size=16, num_blocks=24),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_queue_len=100),
    )


async def probe(engine: AsyncEngine) -> list[int]:
    final = None
    async for out in engine.generate(PROBE, SamplingParams(temperature=0, max_tokens=8), f"probe-{random.random()}"):
        final = out
    assert final.outputs[0].finish_reason == FinishReason.LENGTH
    return list(final.outputs[0].token_ids)


async def client(engine: AsyncEngine, index: int, rng: random.Random) -> str:
    mode = MODES[index % len(MODES)]
    request_id = f"c{index}"
    params = SamplingParams(
        temperature=rng.choice([0.0, 0.8]), max_tokens=rng.randint(1, 16), n=rng.choice([1, 1, 1, 2]), seed=index
    )
    prompt = f"Request {index}: " + "tell me a story " * rng.randint(0, 6)

    async def consume(stop_after: int | None = None) -> str:
        seen = 0
        async for out in engine.generate(prompt, params, request_id):
            seen += 1
            if stop_after is not None and seen >= stop_after:
                return "left early"
            if out.finished:
                return out.outputs[0].finish_reason.value
        return "ended"

    try:
        if mode == "break_early":
            return await consume(stop_after=rng.randint(1, 3))
        if mode == "wait_for":
            return await asyncio.wait_for(consume(), timeout=rng.uniform(0.0, 0.5))
        task = asyncio.create_task(consume())
        if mode == "cancel_at_once":
            await asyncio.sleep(0)  # the task has submitted its add; the engine thread may not have run it yet
            task.cancel()
        elif mode == "cancel_later":
            await asyncio.sleep(rng.uniform(0.0, 0.6))
            task.cancel()
        elif mode == "abort_call":
            await asyncio.sleep(rng.uniform(0.0, 0.6))
            await engine.abort(request_id)
        return await task
    except (asyncio.CancelledError, asyncio.TimeoutError):
        return "cancelled"
    except QueueFullError:
        return "queue full"


async def settle(engine: AsyncEngine, timeout_s: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        stats = await engine.stats()
        if stats.num_running == 0 and stats.num_waiting == 0 and not engine._streams:
            return
        assert loop.time() < deadline, f"engine not idle after {timeout_s}s: {stats}, streams {list(engine._streams)}"
        await asyncio.sleep(0.05)


def test_random_cancel_points_never_kill_the_engine(smollm2_loaded):
    engine = AsyncEngine(LLMEngine(engine_config(), loaded=smollm2_loaded))
    kv = engine.engine.kv_manager
    rng = random.Random(20)

    async def main() -> dict[str, int]:
        reference = await probe(engine)
        results: dict[str, int] = {}
        # Two waves: the second meets whatever the first left behind (freed blocks, dropped results).
        for wave in range(2):
            outcomes = await asyncio.gather(*(client(engine, wave * NUM_CLIENTS + i, rng) for i in range(NUM_CLIENTS)))
            for outcome in outcomes:
                results[outcome] = results.get(outcome, 0) + 1
            await engine.health()
        await settle(engine)
        assert kv.num_free_blocks == kv.num_usable_blocks, "a KV block leaked"
        assert await probe(engine) == reference, "a later request decodes differently"
        return results

    try:
        results = asyncio.run(main())
    finally:
        engine.shutdown()
    assert engine._dead is None
    # Every kind of ending happened, so each cancel point was really exercised.
    for outcome in ("cancelled", "left early", "length"):
        assert results.get(outcome, 0) > 0, results

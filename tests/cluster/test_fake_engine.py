"""FakeEngine honours EngineProtocol: validation, max_tokens, abort, close, queue limit, stats."""

from __future__ import annotations

import asyncio

import pytest
from doubles.fake_engine import FakeEngine
from shardserve.workers.protocol import EngineProtocol, QueueFullError
from shardserve.workers.request import FinishReason, SamplingParams


def run(coro):
    return asyncio.run(coro)


async def collect(engine, prompt, params, rid="r"):
    return [out async for out in engine.generate(prompt, params, rid)]


def test_is_an_engine_protocol_and_deterministic():
    engine = FakeEngine(token_delay_s=0)
    assert isinstance(engine, EngineProtocol)
    a = run(collect(engine, "hello", SamplingParams(max_tokens=5)))
    b = run(collect(FakeEngine(token_delay_s=0), "hello", SamplingParams(max_tokens=5)))
    assert [o.outputs[0].new_text for o in a] == [o.outputs[0].new_text for o in b]
    assert len(a) == 5 and a[-1].finished and a[-1].outputs[0].finish_reason == FinishReason.LENGTH
    assert not any(o.finished for o in a[:-1])
    assert "".join(o.outputs[0].new_text for o in a) == a[-1].outputs[0].text


def test_validation_raises_before_yielding():
    engine = FakeEngine(max_model_len=8, token_delay_s=0)
    with pytest.raises(ValueError, match="prompt must be non-empty"):
        run(collect(engine, "", SamplingParams()))
    with pytest.raises(ValueError, match="max_model_len=8"):
        run(collect(engine, "way too long", SamplingParams()))


def test_abort_and_close_free_all_blocks():
    async def scenario():
        engine = FakeEngine(block_size=4, num_blocks=64, token_delay_s=0.005)
        outs = []

        async def consume():
            async for out in engine.generate("abcdefgh", SamplingParams(max_tokens=1000), "a"):
                outs.append(out)

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        assert engine.debug_state()["held_blocks"]["a"] >= 2
        await engine.abort("a")
        await task
        assert outs[-1].outputs[0].finish_reason == FinishReason.ABORT
        stream = engine.generate("ijklmnop", SamplingParams(max_tokens=1000), "b")
        await stream.__anext__()
        await stream.aclose()  # the consumer walks away
        state = engine.debug_state()
        assert state["aborted"] == ["a", "b"] and state["num_free_blocks"] == 64
        assert (await engine.stats()).kv_cache_usage == 0

    run(scenario())


def test_queue_limit_and_stats():
    async def scenario():
        engine = FakeEngine(max_num_seqs=1, max_queue_len=1, token_delay_s=0.01)
        first = engine.generate("one", SamplingParams(max_tokens=100), "1")
        await first.__anext__()
        second = asyncio.create_task(collect(engine, "two", SamplingParams(max_tokens=1), "2"))
        await asyncio.sleep(0.02)
        stats = await engine.stats()
        assert (stats.num_running, stats.num_waiting) == (1, 1)
        with pytest.raises(QueueFullError):
            await collect(engine, "three", SamplingParams(max_tokens=1), "3")
        await first.aclose()
        assert len(await second) == 1
        assert (await engine.stats()).num_finished == 1

    run(scenario())

"""Bad input gets a ValueError naming the field and its allowed range; the engine keeps serving."""

from __future__ import annotations

import asyncio

import pytest
from shardserve.workers.async_engine import AsyncEngine
from shardserve.workers.config import EngineConfig, ModelConfig
from shardserve.workers.engine import LLMEngine
from shardserve.workers.request import SamplingParams


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": 0}, r"max_tokens must be >= 1, got 0"),
        ({"temperature": -0.5}, r"temperature must be >= 0, got -0.5"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
        ({"top_k": -3}, r"top_k must be -1, 0 \(disabled\) or >= 1, got -3"),
        ({"min_p": 2.0}, r"min_p must be in \[0, 1\], got 2.0"),
        ({"max_tokens": "12"}, r"max_tokens must be an integer >= 1, got str"),
        ({"temperature": "hot"}, r"temperature must be a number >= 0, got str"),
        ({"n": True}, r"n must be an integer >= 1, got True"),
        ({"stop": [""]}, r"stop must be a list of non-empty strings"),
        ({"logprobs": 50}, r"logprobs must be in \[0, 20\], got 50"),
        ({"presence_penalty": 3}, r"presence_penalty must be in \[-2, 2\], got 3"),
        ({"min_tokens": 20, "max_tokens": 10}, r"min_tokens must be in \[0, max_tokens=10\], got 20"),
    ],
)
def test_sampling_params_errors_name_field_and_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


@pytest.fixture(scope="module")
def engine(smollm2_loaded) -> LLMEngine:
    config = EngineConfig(model=ModelConfig(model="default", dtype="float32", device="cpu", max_model_len=64))
    return LLMEngine(config, loaded=smollm2_loaded)


def test_prompt_errors(engine):
    params = SamplingParams(max_tokens=2)
    with pytest.raises(ValueError, match="prompt must contain at least 1 token"):
        engine.add_request("a", "", params)
    with pytest.raises(ValueError, match="prompt must contain at least 1 token"):
        engine.add_request("a", [], params)
    with pytest.raises(ValueError, match=r"prompt is 70 tokens; it must be at most max_model_len - 1 = 63"):
        engine.add_request("a", [100] * 70, params)
    with pytest.raises(ValueError, match="prompt must be a string or a list of token ids, got dict"):
        engine.add_request("a", {"text": "hi"}, params)
    with pytest.raises(ValueError, match=r"prompt token ids must be in \[0, 49152\)"):
        engine.add_request("a", [1, 2, 10**9], params)
    with pytest.raises(ValueError, match="params must be SamplingParams, got dict"):
        engine.add_request("a", "hi", {"max_tokens": 3})
    assert not engine.has_unfinished_requests()


def test_bad_requests_do_not_disturb_good_ones(smollm2_loaded):
    config = EngineConfig(model=ModelConfig(model="default", dtype="float32", device="cpu", max_model_len=64))
    engine = AsyncEngine(LLMEngine(config, loaded=smollm2_loaded))

    async def good(i: int) -> str:
        final = None
        async for out in engine.generate(f"Count to {i}:", SamplingParams(temperature=0, max_tokens=6), f"good-{i}"):
            final = out
        return final.outputs[0].finish_reason.value

    async def bad(prompt, params):
        with pytest.raises(ValueError) as info:
            async for _ in engine.generate(prompt, params, f"bad-{id(params)}"):
                pass
        return str(info.value)

    async def main():
        results = await asyncio.gather(
            good(1), bad("", SamplingParams()), good(2), bad([5] * 100, SamplingParams()), good(3)
        )
        assert results[0] == results[2] == results[4] == "length"
        assert "at least 1 token" in results[1]
        assert "max_model_len - 1 = 63" in results[3]
        await engine.health()
        stats = await engine.stats()
        assert stats.num_running == 0 and stats.num_waiting == 0
        assert stats.num_finished == 3

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()

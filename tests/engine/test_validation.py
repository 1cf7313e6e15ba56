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
        ({"max_tokens": 0}, r"max_tokens must be in \[1, 2147483647\], got 0"),
        ({"temperature": -0.5}, r"temperature must be in \[0, 2\], got -0.5"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\], got 1.5"),
        ({"top_k": -3}, r"top_k must be -1, 0 \(disabled\) or in \[1, 2147483647\], got -3"),
        ({"min_p": 2.0}, r"min_p must be in \[0, 1\], got 2.0"),
        ({"max_tokens": "12"}, r"max_tokens must be an integer >= 1, got str"),
        ({"temperature": "hot"}, r"temperature must be a number in \[0, 2\], got str"),
        ({"n": True}, r"n must be an integer >= 1, got True"),
        ({"stop": [""]}, r"stop must be a list of non-empty strings"),
        ({"logprobs": 50}, r"logprobs must be in \[0, 20\], got 50"),
        ({"presence_penalty": 3}, r"presence_penalty must be in \[-2, 2\], got 3"),
        ({"min_tokens": 20, "max_tokens": 10}, r"min_tokens must be in \[0, max_tokens=10\], got 20"),
        # Finite numbers in documented ranges (issue 20): Infinity / NaN / huge values are refused here,
        # so the offline API refuses them too, not only the servers.
        ({"temperature": float("inf")}, r"temperature must be a number in \[0, 2\] \(a finite number\), got inf"),
        ({"temperature": float("nan")}, r"temperature must be a number in \[0, 2\] \(a finite number\), got nan"),
        ({"temperature": 2.5}, r"temperature must be in \[0, 2\], got 2.5"),
        ({"repetition_penalty": float("inf")}, r"repetition_penalty must be a number in \(0, 2\] \(a finite"),
        ({"repetition_penalty": 2.5}, r"repetition_penalty must be in \(0, 2\], got 2.5"),
        ({"repetition_penalty": 0}, r"repetition_penalty must be in \(0, 2\], got 0"),
        ({"top_p": float("nan")}, r"top_p must be a number in \(0, 1\] \(a finite number\), got nan"),
        ({"min_p": float("-inf")}, r"min_p must be a number in \[0, 1\] \(a finite number\)"),
        ({"frequency_penalty": float("inf")}, r"frequency_penalty must be a number in \[-2, 2\] \(a finite"),
        ({"max_tokens": 4 * 10**9}, r"max_tokens must be in \[1, 2147483647\], got 4000000000"),
        ({"top_k": 10**400}, r"top_k must be -1, 0 \(disabled\) or in \[1, 2147483647\], got 1000.{33}\.\.\.$"),
        ({"seed": 2**64}, r"seed must be in \[-9223372036854775808, 9223372036854775807\], got 18446744073709551616"),
        ({"stop_token_ids": [1, 2**31]}, r"stop_token_ids must be a list of integers in \[0, 2147483647\]"),
        ({"stop": ["ok", "a\ud800b"]}, r"stop\[1\] must be valid Unicode text \(it holds a lone surrogate\)"),
        # A long bad value is never echoed whole (at most a few dozen characters).
        ({"stop": ["x" * 10_000, ""]}, r"stop must be a list of non-empty strings, got \['x{35}\.\.\.$"),
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
    with pytest.raises(ValueError, match=r"^prompt token ids must be in \[0, 49152\), got 1000000000 at position 2$"):
        engine.add_request("a", [1, 2, 10**9] + [5] * 40, params)
    with pytest.raises(ValueError, match=r"^stop_token_ids must be in \[0, 49152\), got 49152$"):
        engine.add_request("a", "hi", SamplingParams(max_tokens=2, min_tokens=1, stop_token_ids=[3, 49152]))
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

"""OpenAI HTTP sampling features on the fake engines: logprobs (completions and chat shapes,
streamed and not), n > 1, vLLM's extra sampling fields reaching the engine, and their errors.

Expected values are recomputed here from FakeEngine's rules (its token stream and
`fake_logprobs`), not from the server's own rendering code.
"""

from __future__ import annotations

import asyncio

import openai
import pytest
import requests
from doubles.fake_engine import FakeEngine, decode_output_token, fake_logprobs
from shardserve.workers.request import SamplingParams

pytestmark = pytest.mark.slow


def client(cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster.http_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def fake_token_ids(prompt: str, max_tokens: int, n: int = 1, seed: int | None = None) -> list[list[int]]:
    """Each sample's token ids, from a local FakeEngine (same rule as the served ones)."""

    async def run() -> list[list[int]]:
        params = SamplingParams(max_tokens=max_tokens, n=n, seed=seed)
        last = [out async for out in FakeEngine(token_delay_s=0).generate(prompt, params, "x")][-1]
        return [list(c.token_ids) for c in last.outputs]

    return asyncio.run(run())


def expected_top(token_id: int, num: int) -> dict[str, float]:
    """Legacy `top_logprobs` of one position: the top-num plus the sampled token."""
    entries = fake_logprobs(token_id, num, decode_output_token)
    return {lp.decoded: lp.logprob for tid, lp in entries.items() if lp.rank <= num or tid == token_id}


def test_completion_logprobs_legacy_shape(cluster):
    prompt = "logprobs please"
    (ids,) = fake_token_ids(prompt, 5)
    resp = client(cluster).completions.create(model="solo", prompt=prompt, max_tokens=5, logprobs=2)
    lp = resp.choices[0].logprobs
    assert lp.tokens == [decode_output_token(k) for k in ids]
    assert lp.token_logprobs == [fake_logprobs(k, 2, decode_output_token)[k].logprob for k in ids]
    assert lp.top_logprobs == [expected_top(k, 2) for k in ids]
    offsets = [sum(len(decode_output_token(k)) for k in ids[:i]) for i in range(len(ids))]
    assert lp.text_offset == offsets and "".join(lp.tokens) == resp.choices[0].text


def test_completion_logprobs_streamed_equal_plain(cluster):
    kwargs = {"model": "solo", "prompt": "stream my logprobs", "max_tokens": 6, "logprobs": 3}
    plain = client(cluster).completions.create(**kwargs).choices[0].logprobs
    assert len(plain.tokens) == 6 and all(len(top) >= 3 for top in plain.top_logprobs)
    parts = [c.choices[0].logprobs for c in client(cluster).completions.create(stream=True, **kwargs) if c.choices]
    assert [t for p in parts for t in p.tokens] == plain.tokens
    assert [t for p in parts for t in p.token_logprobs] == plain.token_logprobs
    assert [t for p in parts for t in p.top_logprobs] == plain.top_logprobs
    assert [t for p in parts for t in p.text_offset] == plain.text_offset  # offsets continue across chunks


def test_chat_logprobs_shape_streamed_and_plain(cluster):
    messages = [{"role": "user", "content": "chat logprobs"}]
    rendered = "<|user|>chat logprobs\n<|assistant|>"
    (ids,) = fake_token_ids(rendered, 4)
    kwargs = {"model": "solo", "messages": messages, "max_tokens": 4, "logprobs": True, "top_logprobs": 2}
    content = client(cluster).chat.completions.create(**kwargs).choices[0].logprobs.content
    assert [c.token for c in content] == [decode_output_token(k) for k in ids]
    for c, k in zip(content, ids, strict=True):
        entries = fake_logprobs(k, 2, decode_output_token)
        assert c.logprob == entries[k].logprob and c.bytes == list(decode_output_token(k).encode())
        top = sorted((lp for lp in entries.values() if lp.rank <= 2), key=lambda lp: lp.rank)
        assert [(t.token, t.logprob) for t in c.top_logprobs] == [(lp.decoded, lp.logprob) for lp in top]
    streamed = client(cluster).chat.completions.create(stream=True, **kwargs)
    parts = [c.choices[0].logprobs.content for c in streamed if c.choices and c.choices[0].logprobs]
    assert [t.model_dump() for p in parts for t in p] == [t.model_dump() for t in content]
    plain = client(cluster).chat.completions.create(model="solo", messages=messages, max_tokens=2)
    assert plain.choices[0].logprobs is None  # off unless asked


def test_n_choices_with_seed(cluster):
    samples = fake_token_ids("several", 3, n=3, seed=11)
    resp = client(cluster).completions.create(model="solo", prompt="several", max_tokens=3, n=3, seed=11)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert [c.text for c in resp.choices] == ["".join(map(decode_output_token, ids)) for ids in samples]
    assert len({c.text for c in resp.choices}) == 3 and resp.usage.completion_tokens == 9
    stream = client(cluster).chat.completions.create(
        model="solo", messages=[{"role": "user", "content": "hi"}], max_tokens=3, n=2, stream=True
    )
    texts: dict[int, str] = {}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    assert sorted(texts) == [0, 1] and texts[0] != texts[1]


def test_extra_sampling_fields_reach_the_engine(cluster):
    body = {
        "model": "solo", "prompt": "params", "max_tokens": 3, "seed": 5, "stop": "zzz", "presence_penalty": 0.5,
        "frequency_penalty": -0.5, "repetition_penalty": 1.1, "top_k": 7, "min_p": 0.05, "min_tokens": 2,
        "ignore_eos": True, "temperature": 0.3, "top_p": 0.9, "user": "someone", "metadata": {"x": "1"},
    }  # fmt: skip
    r = requests.post(cluster.http_url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    params = cluster.debug_state()["params"][r.headers["x-shardserve-request-id"]]
    expected = {k: v for k, v in body.items() if k not in ("model", "prompt", "user", "metadata", "stop")}
    assert {k: params[k] for k in expected} == expected and params["stop"] == ("zzz",)
    chat = {"model": "solo", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 2,
            "stop": ["a", "b"]}  # fmt: skip
    r = requests.post(cluster.http_url + "/v1/chat/completions", json=chat, timeout=30)
    params = cluster.debug_state()["params"][r.headers["x-shardserve-request-id"]]
    assert r.json()["usage"]["completion_tokens"] == 2 and params["max_tokens"] == 2 and params["stop"] == ("a", "b")


@pytest.mark.parametrize(
    ("path", "body", "param", "words"),
    [
        ("completions", {"logprobs": 21}, "logprobs", "[0, 20]"),
        ("completions", {"logprobs": -1}, "logprobs", "[0, 20]"),
        ("completions", {"n": 0}, "n", ">= 1"),
        ("completions", {"best_of": 3}, "best_of", "not supported"),
        ("completions", {"echo": True, "logprobs": 1}, "echo", "not supported"),
        ("completions", {"stop": [""]}, "stop", "non-empty"),
        ("completions", {"min_p": 2}, "min_p", "[0, 1]"),
        ("completions", {"seed": "abc"}, "seed", "integer"),
        ("completions", {"ignore_eos": "maybe"}, "ignore_eos", "boolean"),
        ("chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs", "[0, 20]"),
        ("chat/completions", {"top_logprobs": 2}, "top_logprobs", "logprobs: true"),
        ("chat/completions", {"max_completion_tokens": 0}, "max_completion_tokens", ">= 1"),
    ],
)
def test_bad_sampling_fields_get_400(cluster, path, body, param, words):
    base = {"model": "solo", "max_tokens": 2}
    base.update({"messages": [{"role": "user", "content": "x"}]} if path.startswith("chat") else {"prompt": "x"})
    r = requests.post(f"{cluster.http_url}/v1/{path}", json={**base, **body}, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"], error

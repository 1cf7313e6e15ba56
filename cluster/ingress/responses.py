"""OpenAI JSON of a streamed generation: one response (`collect`) or server-sent events (`sse_events`).

Data flow: the Ingress gets the first `GenerateChunk` (errors surface before any header is
sent) and an iterator over the rest from IngressCore, and hands both here with the parsed body.
Each chunk holds one `CompletionDelta` per choice index (n > 1 gives several), with the text and
token count of this step and, when asked for, the new tokens' logprobs. `collect()` joins them
per index into `choices` (text or message, finish_reason, logprobs in the legacy completions or
the chat shape, see logprobs.py) plus `usage` and vLLM's `prompt_logprobs`; `sse_events()` writes
one `data:` event per chunk (choices that moved), a usage-only chunk when
`stream_options.include_usage`, then `data: [DONE]`; an error after the headers went out becomes
one `error` event. With `echo`, a text prompt is prepended to each choice's text.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from shardserve.cluster.ingress import logprobs as lp
from shardserve.cluster.ingress.core import ChunkStream
from shardserve.cluster.ingress.errors import ApiError
from shardserve.cluster.ingress.openai import ChatCompletionRequest, CompletionRequest
from shardserve.cluster.messages import CompletionDelta, GenerateChunk, PositionLogprob

Body = CompletionRequest | ChatCompletionRequest


def _usage(first: GenerateChunk, num_tokens: int, cost_usd: float | None) -> dict[str, Any]:
    """OpenAI's usage; `cost_usd` (the request's measured cost, workers/cost.py) only when the model is priced."""
    usage = {
        "prompt_tokens": first.num_prompt_tokens,
        "completion_tokens": num_tokens,
        "total_tokens": first.num_prompt_tokens + num_tokens,
        "prompt_tokens_details": {"cached_tokens": first.num_cached_prompt_tokens},
    }
    return usage if cost_usd is None else {**usage, "cost_usd": cost_usd}


def _echo_prefix(body: Body) -> str:
    if isinstance(body, CompletionRequest) and body.echo and isinstance(body.prompt, str):
        return body.prompt
    return ""


@dataclass
class _Choice:
    """What one choice index has produced so far."""

    texts: list[str] = field(default_factory=list)
    logprobs: list[PositionLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    text_offset: int = 0  # where the next token's text starts (legacy completions logprobs)


class _Renderer:
    """Renders choices of one request; keeps per-index state so streamed offsets continue."""

    def __init__(self, body: Body) -> None:
        self.body = body
        self.chat = isinstance(body, ChatCompletionRequest)
        self.num_logprobs = body.num_logprobs
        self.echo = _echo_prefix(body)
        self.choices: dict[int, _Choice] = {}
        self.num_tokens = 0
        self.cost_usd: float | None = None  # from the final chunk

    def add(self, d: CompletionDelta) -> _Choice:
        choice = self.choices.get(d.index)
        if choice is None:
            choice = self.choices[d.index] = _Choice(texts=[self.echo] if self.echo else [])
            choice.text_offset = len(self.echo)
        choice.texts.append(d.text)
        choice.logprobs.extend(d.logprobs or ())
        choice.finish_reason = d.finish_reason or choice.finish_reason
        self.num_tokens += d.num_tokens
        return choice

    def logprobs(self, choice: _Choice, positions: tuple[PositionLogprob, ...] | list[PositionLogprob]) -> Any:
        if self.num_logprobs is None:
            return None
        if self.chat:
            return lp.chat_logprobs(positions, self.num_logprobs)
        rendered = lp.completion_logprobs(positions, self.num_logprobs, choice.text_offset)
        choice.text_offset += sum(len(p.token.text) for p in positions)
        return rendered

    def choice_json(self, index: int, text: str, finish_reason: str | None, logprobs: Any, delta: bool) -> dict:
        if self.chat:
            key = "delta" if delta else "message"
            message = {"role": "assistant", "content": text}
            return {"index": index, key: message, "finish_reason": finish_reason, "logprobs": logprobs}
        return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}


async def collect(body: Body, first: GenerateChunk, rest: ChunkStream) -> dict[str, Any]:
    renderer = _Renderer(body)
    for d in first.deltas:
        renderer.add(d)
    renderer.cost_usd = first.cost_usd
    try:
        async for chunk in rest:
            for d in chunk.deltas:
                renderer.add(d)
            renderer.cost_usd = chunk.cost_usd if chunk.cost_usd is not None else renderer.cost_usd
    finally:
        rest.cancel()  # no-op once finished; stops the engine if this task was cancelled
    choices = []
    for index in sorted(renderer.choices):
        choice = renderer.choices[index]
        logprobs = renderer.logprobs(choice, choice.logprobs)
        choices.append(renderer.choice_json(index, "".join(choice.texts), choice.finish_reason, logprobs, False))
    response: dict[str, Any] = {
        "id": first.request_id,
        "object": "chat.completion" if renderer.chat else "text_completion",
        "created": int(time.time()),
        "model": body.model,
        "choices": choices,
        "usage": _usage(first, renderer.num_tokens, renderer.cost_usd),
    }
    if body.prompt_logprobs is not None and first.prompt_logprobs is not None:
        response["prompt_logprobs"] = lp.prompt_logprobs(first.prompt_logprobs, body.prompt_logprobs)
    return response


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


async def sse_events(body: Body, first: GenerateChunk, rest: ChunkStream) -> AsyncIterator[str]:
    """Server-sent events; on an error after the headers went out, one `error` event ends it."""
    renderer = _Renderer(body)
    head = {
        "id": first.request_id,
        "object": "chat.completion.chunk" if renderer.chat else "text_completion",
        "created": int(time.time()),
        "model": body.model,
    }

    def event_of(chunk: GenerateChunk) -> str | None:
        renderer.cost_usd = chunk.cost_usd if chunk.cost_usd is not None else renderer.cost_usd
        choices = []
        for d in chunk.deltas:
            is_new = d.index not in renderer.choices
            choice = renderer.add(d)
            text = (renderer.echo if is_new else "") + d.text
            if text or d.finish_reason or d.logprobs:
                logprobs = renderer.logprobs(choice, d.logprobs or ())
                choices.append(renderer.choice_json(d.index, text, d.finish_reason, logprobs, True))
        return _event({**head, "choices": choices}) if choices else None

    try:
        event = event_of(first)
        if event is not None:
            yield event
        async for chunk in rest:
            event = event_of(chunk)
            if event is not None:
                yield event
        if body.stream_options is not None and body.stream_options.include_usage:
            yield _event({**head, "choices": [], "usage": _usage(first, renderer.num_tokens, renderer.cost_usd)})
        yield "data: [DONE]\n\n"
    except ApiError as err:
        yield _event(err.openai_body())
    finally:
        rest.cancel()  # synchronous: safe even while this generator is being cancelled

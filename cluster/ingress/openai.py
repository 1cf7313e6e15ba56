"""OpenAI-compatible request bodies and responses (/v1/completions, /v1/chat/completions).

Data flow: FastAPI parses the JSON body into `CompletionRequest` / `ChatCompletionRequest`
(pydantic: wrong types become 400s naming the field); `to_generate_request` maps the OpenAI
fields onto `SamplingParams`, whose own validation names any out-of-range field (→ 400 with
`param` set). The Ingress streams `GenerateChunk`s from IngressCore and this module turns them
into OpenAI JSON: `collect()` for a plain response, `sse_events()` for `stream: true` (one
`data:` event per chunk, a final usage-only chunk when `stream_options.include_usage`, then
`data: [DONE]`).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from shardserve.cluster.ingress.errors import ApiError
from shardserve.cluster.messages import ErrorKind, GenerateChunk, GenerateRequest
from shardserve.cluster.server import param_of
from shardserve.workers.request import SamplingParams


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields we ignore (user, ...)

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: Any = None
    # Extensions (vLLM names).
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    priority: int = 0


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] = Field(..., description="Text, token ids, or a one-element list.")
    echo: bool = False


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = None


_SAMPLING_FIELDS = (
    "max_tokens", "temperature", "top_p", "n", "seed", "presence_penalty", "frequency_penalty",
    "top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids",
)  # fmt: skip


def to_sampling_params(body: _Common) -> SamplingParams:
    if body.logprobs not in (None, False):
        raise ApiError(ErrorKind.INVALID_ARGUMENT, "logprobs is not supported by this server yet", "logprobs")
    kwargs: dict[str, Any] = {f: getattr(body, f) for f in _SAMPLING_FIELDS if getattr(body, f) is not None}
    if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
        kwargs["max_tokens"] = body.max_completion_tokens
    if body.stop is not None:
        kwargs["stop"] = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop)
    try:
        return SamplingParams(**kwargs)
    except ValueError as err:
        raise ApiError(ErrorKind.INVALID_ARGUMENT, str(err), param_of(str(err))) from None


def _text_of(content: str | list[dict[str, Any]] | None, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text":
            raise ApiError(
                ErrorKind.INVALID_ARGUMENT,
                f"messages[{index}].content parts must have type text, got {part.get('type')!r}",
                f"messages[{index}].content",
            )
        parts.append(str(part.get("text", "")))
    return "".join(parts)


def to_generate_request(body: CompletionRequest | ChatCompletionRequest, kind: str) -> GenerateRequest:
    params = to_sampling_params(body)
    request_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
    if isinstance(body, ChatCompletionRequest):
        messages = tuple(
            ("system" if m.role == "developer" else m.role, _text_of(m.content, i)) for i, m in enumerate(body.messages)
        )
        return GenerateRequest(request_id, body.model, params, messages=messages, priority=body.priority)
    prompt: Any = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise ApiError(ErrorKind.INVALID_ARGUMENT, f"prompt must be one string, got {len(prompt)}", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, list):
        prompt = tuple(prompt)
    if not prompt:
        raise ApiError(ErrorKind.INVALID_ARGUMENT, "prompt must be non-empty", "prompt")
    return GenerateRequest(request_id, body.model, params, prompt=prompt, priority=body.priority)


def _usage(first: GenerateChunk, num_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": first.num_prompt_tokens,
        "completion_tokens": num_tokens,
        "total_tokens": first.num_prompt_tokens + num_tokens,
        "prompt_tokens_details": {"cached_tokens": first.num_cached_prompt_tokens},
    }


def _choice(kind: str, index: int, text: str, finish_reason: str | None, delta: bool) -> dict[str, Any]:
    if kind == "chat":
        key = "delta" if delta else "message"
        return {"index": index, key: {"role": "assistant", "content": text}, "finish_reason": finish_reason, "logprobs": None}
    return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}


async def collect(
    kind: str, body: _Common, first: GenerateChunk, rest: AsyncIterator[GenerateChunk]
) -> dict[str, Any]:
    texts: dict[int, list[str]] = {}
    reasons: dict[int, str | None] = {}
    num_tokens = 0

    def add(chunk: GenerateChunk) -> None:
        nonlocal num_tokens
        for d in chunk.deltas:
            texts.setdefault(d.index, []).append(d.text)
            reasons[d.index] = d.finish_reason or reasons.get(d.index)
            num_tokens += d.num_tokens

    add(first)
    async for chunk in rest:
        add(chunk)
    prefix = body.prompt if kind == "completion" and getattr(body, "echo", False) and isinstance(body.prompt, str) else ""
    return {
        "id": first.request_id,
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": body.model,
        "choices": [_choice(kind, i, prefix + "".join(texts[i]), reasons.get(i), delta=False) for i in sorted(texts)],
        "usage": _usage(first, num_tokens),
    }


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


async def sse_events(
    kind: str, body: _Common, first: GenerateChunk, rest: AsyncIterator[GenerateChunk]
) -> AsyncIterator[str]:
    """Server-sent events; on an error after the headers went out, one `error` event ends it."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    created = int(time.time())
    num_tokens = 0

    async def chunks() -> AsyncIterator[GenerateChunk]:
        yield first
        async for chunk in rest:
            yield chunk

    stream = chunks()
    try:
        async for chunk in stream:
            choices = []
            for d in chunk.deltas:
                num_tokens += d.num_tokens
                if d.text or d.finish_reason:
                    choices.append(_choice(kind, d.index, d.text, d.finish_reason, delta=True))
            if choices:
                yield _event({"id": chunk.request_id, "object": obj, "created": created, "model": body.model, "choices": choices})
        if body.stream_options is not None and body.stream_options.include_usage:
            usage = _usage(first, num_tokens)
            yield _event({"id": first.request_id, "object": obj, "created": created, "model": body.model, "choices": [], "usage": usage})
        yield "data: [DONE]\n\n"
    except ApiError as err:
        yield _event(err.openai_body())
    finally:
        await stream.aclose()
        await rest.aclose()  # type: ignore[attr-defined]

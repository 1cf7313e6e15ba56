"""OpenAI-compatible request bodies (/v1/completions, /v1/chat/completions) → GenerateRequest.

Data flow: FastAPI parses the JSON body into `CompletionRequest` / `ChatCompletionRequest`
(pydantic: a wrong type or a non-finite number on a known field becomes a 400 naming the field).
`to_generate_request` first refuses text that is not valid Unicode and any unknown or
unimplemented field that carries a value (`logit_bias`, `tools`, ... → 400 naming it; the harmless
`user`, `metadata`, `store`, `service_tier` are accepted and ignored: cluster/ingress/validation.py),
then maps the OpenAI fields and vLLM's extra sampling fields onto `SamplingParams`, whose own
validation names any out-of-range field (→ 400 with `param` set); fields whose OpenAI name differs
from the engine's (`top_logprobs`, `max_completion_tokens`) are checked here under their own names.
Last, the deployment's `limits` (n, stop strings, prompt size, strict max_tokens) apply. The Ingress
then streams `GenerateChunk`s from IngressCore and cluster/ingress/responses.py renders them.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from shardserve.cluster.config import AppConfig
from shardserve.cluster.ingress import validation
from shardserve.cluster.ingress.errors import ApiError, short
from shardserve.cluster.messages import ErrorKind, GenerateRequest
from shardserve.cluster.server import param_of
from shardserve.workers.request import (
    MAX_INT32,
    MAX_INT64,
    MAX_REPETITION_PENALTY,
    MAX_TEMPERATURE,
    MIN_INT64,
    SamplingParams,
)

# Ranges in the OpenAPI document (documentation: SamplingParams is what enforces them).
_INT_RANGE = {"minimum": 1, "maximum": MAX_INT32}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    # Extra fields are kept so validation.check_extra_fields can name them (400 unless null or empty);
    # the OpenAPI document says what is accepted: no other properties.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, json_schema_extra={"additionalProperties": False})

    model: str = Field(..., description="A served model's name (GET /v1/models).")
    max_tokens: int | None = Field(
        None, description="New tokens at most, in [1, 2**31 - 1] (default 16); generation also stops at the "
        "model's context length (finish_reason length) unless limits.strict_max_tokens refuses larger values.",
        json_schema_extra=_INT_RANGE,
    )  # fmt: skip
    temperature: float | None = Field(
        None,
        description="In [0, 2]; 0 = greedy (default 1).",
        json_schema_extra={"minimum": 0, "maximum": MAX_TEMPERATURE},
    )
    top_p: float | None = Field(
        None, description="In (0, 1] (default 1).", json_schema_extra={"exclusiveMinimum": 0, "maximum": 1}
    )
    n: int = Field(
        1,
        description="Completions per prompt, in [1, limits.max_n] (default max 16).",
        json_schema_extra={"minimum": 1},
    )
    best_of: int | None = Field(None, description="Only best_of == n is supported.")
    stream: bool = Field(False, description="Server-sent events, one per engine step.")
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(
        None,
        description="Up to limits.max_stop_strings non-empty strings of at most limits.max_stop_string_chars.",
    )
    seed: int | None = Field(
        None,
        description="In the int64 range; the same seed gives the same tokens.",
        json_schema_extra={"minimum": MIN_INT64, "maximum": MAX_INT64},
    )
    presence_penalty: float | None = Field(
        None, description="In [-2, 2] (default 0).", json_schema_extra={"minimum": -2, "maximum": 2}
    )
    frequency_penalty: float | None = Field(
        None, description="In [-2, 2] (default 0).", json_schema_extra={"minimum": -2, "maximum": 2}
    )
    # Accepted and ignored: they change nothing in the output (cluster/ingress/validation.py).
    user: str | None = Field(None, description="Labels the caller: the metrics' tenant when no API key names it.")
    metadata: dict[str, str] | None = Field(None, description="Accepted and ignored (OpenAI's stored-request tags).")
    store: bool | None = Field(None, description="Accepted and ignored (OpenAI's request storage).")
    service_tier: str | None = Field(None, description="Accepted and ignored (OpenAI's latency tier).")
    # Extensions (vLLM names).
    top_k: int | None = Field(
        None,
        description="0 or -1 disables, else in [1, 2**31 - 1].",
        json_schema_extra={"minimum": -1, "maximum": MAX_INT32},
    )
    min_p: float | None = Field(
        None, description="In [0, 1] (default 0).", json_schema_extra={"minimum": 0, "maximum": 1}
    )
    repetition_penalty: float | None = Field(
        None,
        description="In (0, 2]; 1 disables.",
        json_schema_extra={"exclusiveMinimum": 0, "maximum": MAX_REPETITION_PENALTY},
    )
    min_tokens: int | None = Field(
        None, description="In [0, max_tokens].", json_schema_extra={"minimum": 0, "maximum": MAX_INT32}
    )
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = Field(
        None,
        description="Token ids in [0, vocab size).",
        json_schema_extra={"items": {"type": "integer", "minimum": 0}},
    )
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    prompt_logprobs: int | None = Field(
        None,
        description="In [0, 20]; not with stream.",
        json_schema_extra={"minimum": 0, "maximum": SamplingParams.MAX_LOGPROBS},
    )
    priority: int = Field(
        0, ge=-MAX_INT32 - 1, le=MAX_INT32, description="Lower first (scheduler.policy priority)."
    )


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] = Field(
        ...,
        description="Non-empty text, token ids, or a one-element list of text.",
        json_schema_extra={"minLength": 1, "minItems": 1},
    )
    echo: bool = False
    logprobs: int | None = Field(
        None,
        description="Top-N logprobs per token, in [0, 20].",
        json_schema_extra={"minimum": 0, "maximum": 20},
    )

    @property
    def num_logprobs(self) -> int | None:
        """Top alternatives per sampled token, or None when logprobs are off."""
        return self.logprobs


class ChatMessage(BaseModel):
    # e.g. `name`, `tool_calls`: refused unless null or empty (validation.check_extra_fields)
    model_config = ConfigDict(extra="allow", json_schema_extra={"additionalProperties": False})

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(
        None, description="OpenAI's newer max_tokens.", json_schema_extra=_INT_RANGE
    )
    logprobs: bool = False
    top_logprobs: int | None = Field(
        None, description="In [0, 20]; needs logprobs: true.", json_schema_extra={"minimum": 0, "maximum": 20}
    )

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


_SAMPLING_FIELDS = (
    "max_tokens", "temperature", "top_p", "n", "seed", "presence_penalty", "frequency_penalty",
    "top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids",
    "include_stop_str_in_output", "skip_special_tokens", "prompt_logprobs",
)  # fmt: skip


def _invalid(message: str, param: str) -> ApiError:
    return ApiError(ErrorKind.INVALID_ARGUMENT, message, param)


def _check_openai_names(body: CompletionRequest | ChatCompletionRequest) -> None:
    """Rules on fields whose OpenAI name is not the SamplingParams name (so errors name the right one)."""
    if body.best_of is not None and body.best_of != body.n:
        raise _invalid(
            f"best_of is not supported (only best_of == n), got best_of={body.best_of}, n={body.n}", "best_of"
        )
    if body.prompt_logprobs is not None and body.stream:
        raise _invalid("prompt_logprobs is not available with stream: true", "prompt_logprobs")
    if isinstance(body, ChatCompletionRequest) and body.top_logprobs is not None:
        if not body.logprobs:
            raise _invalid("top_logprobs needs logprobs: true", "top_logprobs")
        if not 0 <= body.top_logprobs <= SamplingParams.MAX_LOGPROBS:
            raise _invalid(
                f"top_logprobs must be in [0, {SamplingParams.MAX_LOGPROBS}], got {body.top_logprobs}",
                "top_logprobs",
            )
    if (
        isinstance(body, ChatCompletionRequest)
        and body.max_completion_tokens is not None
        and body.max_completion_tokens < 1
    ):
        raise _invalid(
            f"max_completion_tokens must be >= 1, got {body.max_completion_tokens}", "max_completion_tokens"
        )
    if isinstance(body, CompletionRequest) and body.echo and body.logprobs is not None:
        raise _invalid("echo with logprobs is not supported; ask for prompt_logprobs instead", "echo")


def to_sampling_params(body: CompletionRequest | ChatCompletionRequest) -> SamplingParams:
    _check_openai_names(body)
    kwargs: dict[str, Any] = {f: getattr(body, f) for f in _SAMPLING_FIELDS if getattr(body, f) is not None}
    if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
        kwargs["max_tokens"] = body.max_completion_tokens
    if body.stop is not None:
        kwargs["stop"] = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop)
    kwargs["logprobs"] = body.num_logprobs
    try:
        return SamplingParams(**kwargs)
    except ValueError as err:
        raise ApiError(ErrorKind.INVALID_ARGUMENT, str(err), param_of(str(err))) from None


def _text_of(content: str | list[dict[str, Any]] | None, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for i, part in enumerate(content):
        param = f"messages[{index}].content[{i}]"
        if part.get("type") != "text":
            raise ApiError(
                ErrorKind.INVALID_ARGUMENT,
                f"{param}.type must be text, got {short(part.get('type'))}",
                f"{param}.type",
            )
        if not isinstance(part.get("text"), str):
            raise ApiError(ErrorKind.INVALID_ARGUMENT, f"{param}.text must be a string", f"{param}.text")
        validation.check_extra_fields({k: v for k, v in part.items() if k not in ("type", "text")}, param)
        parts.append(part["text"])
    return "".join(parts)


def _check_body(body: CompletionRequest | ChatCompletionRequest) -> None:
    """Valid Unicode everywhere, and no unknown or unimplemented field carrying a value."""
    validation.check_text(body.model_dump())
    validation.check_extra_fields(body.model_extra)
    if isinstance(body, ChatCompletionRequest):
        for i, message in enumerate(body.messages):
            validation.check_extra_fields(message.model_extra, f"messages[{i}]")


def to_generate_request(
    body: CompletionRequest | ChatCompletionRequest, kind: str, config: AppConfig | None = None
) -> GenerateRequest:
    """The GenerateRequest of an OpenAI body; `config` (the Ingress's) adds its `limits` checks."""
    _check_body(body)
    request = _to_generate_request(body, kind)
    if config is not None:
        max_tokens_name = "max_tokens"
        if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
            max_tokens_name = "max_completion_tokens"
        validation.check_limits(
            request,
            config.model(body.model),
            config.limits,
            max_tokens_name=max_tokens_name,
            token_ids_name="prompt",
        )
    return request


def _to_generate_request(body: CompletionRequest | ChatCompletionRequest, kind: str) -> GenerateRequest:
    params = to_sampling_params(body)
    request_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
    if isinstance(body, ChatCompletionRequest):
        messages = tuple(
            ("system" if m.role == "developer" else m.role, _text_of(m.content, i))
            for i, m in enumerate(body.messages)
        )
        return GenerateRequest(request_id, body.model, params, messages=messages, priority=body.priority)
    prompt: Any = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise ApiError(
                ErrorKind.INVALID_ARGUMENT, f"prompt must be one string, got {len(prompt)}", "prompt"
            )
        prompt = prompt[0]
    if isinstance(prompt, list):
        prompt = tuple(prompt)
    if not prompt:
        raise ApiError(ErrorKind.INVALID_ARGUMENT, "prompt must be non-empty", "prompt")
    return GenerateRequest(request_id, body.model, params, prompt=prompt, priority=body.priority)

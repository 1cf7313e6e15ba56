"""Edge validation shared by the HTTP and gRPC front ends: what a request may ask of this deployment.

Data flow: a front end parses the body (pydantic for HTTP, protobuf for gRPC) and builds a
`GenerateRequest`, whose `SamplingParams` already checked each field's own range (finite numbers,
workers/request.py). Before the request leaves the Ingress:
  - HTTP bodies go through `invalid_text_path` (a lone surrogate such as JSON's "\\ud800" is not
    Unicode text: 400 naming the field) and `check_extra_fields` (an OpenAI field that would change
    the output and that we do not implement, e.g. `logit_bias` or `tools`, is a 400 naming it;
    harmless ones listed in `IGNORED_FIELDS` pass; null / empty values pass);
  - both APIs call `check_limits`, which applies the deployment's `limits` config (n, stop strings,
    prompt size, max_tokens against the context when `strict_max_tokens`) and the chat role set.
Every failure is an `ApiError(INVALID_ARGUMENT, message, param)`: HTTP 400 / gRPC INVALID_ARGUMENT,
`param` naming the field as the client spelled it (`params.n` over gRPC), messages quoting at most a
few dozen characters of the request.
"""

from __future__ import annotations

from typing import Any

from shardserve.cluster.config import LimitsSection, ModelSection
from shardserve.cluster.ingress.errors import ApiError, short
from shardserve.cluster.messages import ErrorKind, GenerateRequest

CHAT_ROLES = ("system", "user", "assistant", "developer")  # developer is OpenAI's new name for system

# Accepted and ignored: they change nothing in the output (the rule: a field that changes the output
# and that we do not honour is refused). `user` / `metadata` / `store` label or store the request at
# OpenAI; `service_tier` picks OpenAI's latency class.
IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier"})
# OpenAI (and vLLM) fields we know and do not implement: each gets a 400 naming it when it carries
# a value. Any other unknown field gets the same 400 (OpenAI refuses unknown fields too).
UNSUPPORTED_FIELDS = frozenset({
    "logit_bias", "tools", "tool_choice", "functions", "function_call", "response_format",
    "parallel_tool_calls", "suffix", "audio", "modalities", "prediction", "reasoning_effort",
    "web_search_options", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
    "structured_outputs", "logits_processors", "truncate_prompt_tokens", "use_beam_search",
})  # fmt: skip
# Values that ask for nothing, so accepting them honours them (clients often send defaults).
_NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "tool_choice": ("none",),
    "parallel_tool_calls": (True, False),
    "response_format": ({"type": "text"},),
    "use_beam_search": (False,),
}


def _invalid(message: str, param: str | None) -> ApiError:
    return ApiError(ErrorKind.INVALID_ARGUMENT, message, param)


def _is_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    if not key.isidentifier():  # "" or "a b": quoted, so the path stays readable
        return f"{path}[{short(key)}]"
    return f"{path}.{key}" if path else key


def invalid_text_path(value: Any, path: str = "") -> str | None:
    """Path (`messages[0].content`) of the first string or key in `value` that is not valid Unicode."""
    if isinstance(value, str):
        return None if _is_text(value) else (path or "body")
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and not _is_text(key):
                return _join(path, key)
            found = invalid_text_path(item, _join(path, key))
            if found is not None:
                return found
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found = invalid_text_path(item, _join(path, index))
            if found is not None:
                return found
    return None


def check_text(body: dict[str, Any]) -> None:
    """400 naming the first field whose text holds a lone surrogate (UTF-8 cannot encode it)."""
    path = invalid_text_path(body)
    if path is not None:
        raise _invalid(f"{path} must be valid Unicode text (it holds a lone surrogate such as \\ud800)", path)


def _is_neutral(name: str, value: Any) -> bool:
    return (
        value is None or value == {} or value == [] or value == "" or value in _NEUTRAL_VALUES.get(name, ())
    )


def check_extra_fields(extra: dict[str, Any] | None, path: str = "") -> None:
    """400 for an unknown or unimplemented field that carries a value (see the module docstring)."""
    for name, value in (extra or {}).items():
        if name in IGNORED_FIELDS or _is_neutral(name, value):
            continue
        param = _join(path, name)
        if name in UNSUPPORTED_FIELDS:
            raise _invalid(f"{param} is not supported by this server; leave it out", param)
        raise _invalid(f"{param} is not a field this server implements (unknown fields are refused)", param)


def check_limits(
    request: GenerateRequest,
    model: ModelSection,
    limits: LimitsSection,
    params_prefix: str = "",
    max_tokens_name: str = "max_tokens",
    token_ids_name: str = "prompt_token_ids",
) -> None:
    """The deployment's `limits` and the chat role set; params named as the client spells them."""
    params = request.params
    if params.n > limits.max_n:
        raise _invalid(
            f"n must be in [1, {limits.max_n}] (limits.max_n), got {params.n}", f"{params_prefix}n"
        )
    stop = f"{params_prefix}stop"
    if len(params.stop) > limits.max_stop_strings:
        raise _invalid(
            f"stop must hold at most {limits.max_stop_strings} strings (limits.max_stop_strings), "
            f"got {len(params.stop)}",
            stop,
        )
    for i, text in enumerate(params.stop):
        if len(text) > limits.max_stop_string_chars:
            raise _invalid(
                f"stop[{i}] must be at most {limits.max_stop_string_chars} characters "
                f"(limits.max_stop_string_chars), got {len(text)}",
                f"{stop}[{i}]",
            )
    if (
        limits.strict_max_tokens
        and model.max_model_len is not None
        and params.max_tokens > model.max_model_len
    ):
        raise _invalid(
            f"{max_tokens_name} must be at most the context length of model {short(model.name)}, "
            f"max_model_len = {model.max_model_len} (limits.strict_max_tokens), got {params.max_tokens}",
            f"{params_prefix}{max_tokens_name}",
        )
    _check_prompt(request, limits, token_ids_name)


def _check_prompt(request: GenerateRequest, limits: LimitsSection, token_ids_name: str) -> None:
    if request.messages is not None:
        for i, (role, _) in enumerate(request.messages):
            if role not in CHAT_ROLES:
                raise _invalid(
                    f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {short(role)}",
                    f"messages[{i}].role",
                )
        size, param = sum(len(content) for _, content in request.messages), "messages"
    else:
        size = len(request.prompt or ())
        token_ids = not (isinstance(request.prompt, str) or request.prompt is None)
        param = token_ids_name if token_ids else "prompt"
    if size > limits.max_prompt_chars:
        what = (
            "token ids" if request.messages is None and not isinstance(request.prompt, str) else "characters"
        )
        raise _invalid(
            f"{param} must be at most {limits.max_prompt_chars} {what} in all (limits.max_prompt_chars), got {size}",
            param,
        )

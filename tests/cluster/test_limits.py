"""The `limits` config section and the edge checks it drives, without Ray: each accepted value is
honoured (the boundary passes, one past it is a 400 naming the field) and bad values are refused."""

from __future__ import annotations

import pytest
from shardserve.cluster.config import AppConfig, ConfigError, LimitsSection, parse_config
from shardserve.cluster.ingress import openai as oai
from shardserve.cluster.ingress import validation
from shardserve.cluster.ingress.errors import ApiError
from shardserve.cluster.ingress.http_edge import validation_error
from shardserve.cluster.messages import GenerateRequest
from shardserve.workers.request import SamplingParams


def app_config(limits: dict | None = None, max_model_len: int | None = 64) -> AppConfig:
    data = {"models": [{"name": "m", "max_model_len": max_model_len}], "limits": limits or {}}
    return parse_config(data, AppConfig)


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"max_n": 0}, "limits.max_n: must be >= 1, got 0"),
        ({"max_n": 5000}, "limits.max_n: must be <= 1024, got 5000"),
        ({"max_stop_strings": -1}, "limits.max_stop_strings: must be >= 0"),
        ({"max_body_bytes": 10}, "limits.max_body_bytes: must be >= 1024"),
        ({"max_prompt_chars": 0}, "limits.max_prompt_chars: must be >= 1"),
        ({"strict_max_tokens": "perhaps"}, "limits.strict_max_tokens"),
        ({"max_batch": 3}, "limits.max_batch: unknown field"),
    ],
)
def test_bad_limits_are_refused_naming_the_field(limits, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        app_config(limits)


def test_strict_max_tokens_needs_every_model_length():
    with pytest.raises(ConfigError, match=r"limits.strict_max_tokens needs max_model_len set on every model"):
        app_config({"strict_max_tokens": True}, max_model_len=None)
    assert app_config({"strict_max_tokens": True}).limits.strict_max_tokens


def test_limits_are_in_the_json_schema_with_descriptions():
    props = LimitsSection.model_json_schema()["properties"]
    assert set(props) == {"max_n", "max_stop_strings", "max_stop_string_chars", "max_prompt_chars",
                          "max_body_bytes", "strict_max_tokens"}  # fmt: skip
    assert all(p.get("description") for p in props.values())


def request(prompt="hello", messages=None, **params) -> GenerateRequest:
    return GenerateRequest("r", "m", SamplingParams(**params), prompt=None if messages else prompt, messages=messages)


def refused(req: GenerateRequest, config: AppConfig, **kwargs) -> ApiError:
    with pytest.raises(ApiError) as info:
        validation.check_limits(req, config.model("m"), config.limits, **kwargs)
    assert info.value.http_status == 400
    return info.value


def test_each_limit_is_honoured_at_its_boundary():
    config = app_config({"max_n": 3, "max_stop_strings": 2, "max_stop_string_chars": 4, "max_prompt_chars": 10})
    ok = [request(n=3), request(stop=("abcd", "x")), request(prompt="x" * 10), request(messages=(("user", "x" * 10),))]
    for req in ok:
        validation.check_limits(req, config.model("m"), config.limits)
    assert refused(request(n=4), config).param == "n"
    assert refused(request(n=4), config, params_prefix="params.").param == "params.n"
    assert refused(request(stop=("a", "b", "c")), config).param == "stop"
    assert refused(request(stop=("a", "abcde")), config).param == "stop[1]"
    assert refused(request(prompt="x" * 11), config).param == "prompt"
    assert refused(request(prompt=tuple(range(11))), config, token_ids_name="prompt").param == "prompt"
    assert refused(request(messages=(("user", "x" * 6), ("assistant", "y" * 5))), config).param == "messages"
    error = refused(request(messages=(("user", "x"), ("robot", "y"))), config)
    assert error.param == "messages[1].role" and "robot" in error.message


def test_max_tokens_is_capped_unless_strict():
    lenient, strict = app_config(), app_config({"strict_max_tokens": True})
    validation.check_limits(request(max_tokens=1000), lenient.model("m"), lenient.limits)  # the engine caps it
    validation.check_limits(request(max_tokens=64), strict.model("m"), strict.limits)
    error = refused(request(max_tokens=65), strict, max_tokens_name="max_completion_tokens")
    assert error.param == "max_completion_tokens" and "max_model_len = 64" in error.message
    body = oai.ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], max_completion_tokens=65)
    with pytest.raises(ApiError) as info:
        oai.to_generate_request(body, "chat", strict)
    assert info.value.param == "max_completion_tokens"
    assert oai.to_generate_request(body, "chat", lenient).params.max_tokens == 65


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"logit_bias": {"1": 5}}, "logit_bias"), ({"tools": [{}]}, "tools"), ({"foo": 1}, "foo"), ({"": 1}, "['']")],
)
def test_fields_we_do_not_implement_are_refused(extra, param):
    with pytest.raises(ApiError) as info:
        oai.to_generate_request(oai.CompletionRequest(model="m", prompt="x", **extra), "completion", app_config())
    assert info.value.param == param


def test_harmless_and_empty_fields_pass():
    body = oai.CompletionRequest(model="m", prompt="x", user="u", metadata={"a": "b"}, store=True, logit_bias={},
                                 tools=None, response_format={"type": "text"}, parallel_tool_calls=False)  # fmt: skip
    assert oai.to_generate_request(body, "completion", app_config()).prompt == "x"


def test_lone_surrogates_are_found_by_path():
    assert validation.invalid_text_path({"a": ["ok", {"b": "x\ud800"}]}) == "a[1].b"
    assert validation.invalid_text_path({"ok": "fine", "k\udfff": 1}) == "['k\\udfff']"  # quoted, UTF-8 safe
    assert validation.invalid_text_path({"a": "\U0001f600 ok"}) is None


def test_json_errors_never_name_a_byte_offset():
    from fastapi.exceptions import RequestValidationError

    err = RequestValidationError([{"type": "json_invalid", "loc": ("body", 34), "msg": "JSON decode error",
                                   "ctx": {"error": "Expecting value"}}])  # fmt: skip
    api_error = validation_error(err)
    assert api_error.param is None and "not valid JSON: Expecting value at byte 34" in api_error.message
    union = RequestValidationError([{"type": "string_type", "loc": ("body", "prompt", "str"), "msg": "bad"}])
    assert validation_error(union).param == "prompt"
    nested = RequestValidationError([{"type": "literal_error", "loc": ("body", "messages", 2, "role"), "msg": "x"}])
    assert validation_error(nested).param == "messages[2].role"


def test_prefix_hash_takes_any_str():
    # A lone surrogate once made the router's hashing raise, which stalled the request in Serve.
    from shardserve.cluster.router import prefix_chain

    assert len(prefix_chain("x\ud800y" * 40)) == 2 and prefix_chain("x\ud800y") != prefix_chain("x\udfffy")

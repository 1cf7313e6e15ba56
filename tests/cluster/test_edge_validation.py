"""Edge validation through the served app (issue 20 item 3): every bad request gets a clear 4xx in
OpenAI's error shape with `param` naming the field (gRPC: INVALID_ARGUMENT naming it), messages
never echo the prompt, and the service keeps answering good requests.

Raw `httpx` requests carry the malformed bodies (lone surrogates, Infinity, invalid UTF-8, bad JSON,
huge bodies); gRPC uses the generated stubs, and a raw channel with identity serializers for bytes
that are not a valid message. Fake engines: the model is beside the point here.
"""

from __future__ import annotations

import grpc
import httpx
import pytest
from shardserve.cluster.proto import llm_pb2 as pb
from shardserve.cluster.proto import llm_pb2_grpc as rpc

pytestmark = pytest.mark.slow

LONG = "secret prompt text " * 600  # 11 KB: must never come back in an error message
ECHO = "secret prompt text " * 3  # longer than any quoted value may be (a few dozen characters)
MAX_MESSAGE_CHARS = 600
DEFAULT_MAX_BODY_BYTES = 8 << 20


@pytest.fixture(scope="module")
def http(cluster):
    with httpx.Client(base_url=cluster.http_url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def stub(cluster):
    channel = grpc.insecure_channel(cluster.grpc_target)
    yield rpc.LLMServiceStub(channel)
    channel.close()


def assert_openai_error(r: httpx.Response, status: int, param: str | None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    assert error["param"] == param, error
    assert len(error["message"]) <= MAX_MESSAGE_CHARS and ECHO not in error["message"], error
    return error


def completion(**fields) -> dict:
    return {"model": "fake", "prompt": "hello", "max_tokens": 2, **fields}


def chat(*messages: dict, **fields) -> dict:
    return {"model": "fake", "messages": list(messages) or [{"role": "user", "content": "hi"}], "max_tokens": 2,
            **fields}  # fmt: skip


# ---- HTTP: values out of range, unknown fields, limits -------------------------------------------
@pytest.mark.parametrize(
    ("path", "body", "param", "words"),
    [
        ("completions", completion(n=1000), "n", "limits.max_n"),
        ("completions", completion(best_of=1000, n=1000), "n", "[1, 16]"),
        ("completions", completion(max_tokens=4e9), "max_tokens", "[1, 2147483647]"),
        ("completions", completion(stop=[f"s{i}" for i in range(1000)]), "stop", "limits.max_stop_strings"),
        ("completions", completion(stop=["ok", "x" * 300]), "stop[1]", "at most 256 characters"),
        ("completions", completion(stop=["", LONG]), "stop", "non-empty"),
        ("completions", completion(top_k=10**400), "top_k", "2147483647"),
        ("completions", completion(seed=2**70), "seed", "9223372036854775807"),
        ("completions", completion(priority=2**40), "priority", "less than or equal"),
        ("completions", completion(temperature=2.5), "temperature", "[0, 2]"),
        ("completions", completion(repetition_penalty=3), "repetition_penalty", "(0, 2]"),
        ("completions", completion(prompt="x" * 2_000_001), "prompt", "limits.max_prompt_chars"),
        ("completions", completion(logit_bias={"50256": -100}), "logit_bias", "not supported"),
        ("completions", completion(suffix="tail"), "suffix", "not supported"),
        ("completions", completion(temprature=0.5), "temprature", "unknown fields are refused"),
        ("chat/completions", chat(tools=[{"type": "function", "function": {"name": "f"}}]), "tools", "not supported"),
        ("chat/completions", chat(response_format={"type": "json_object"}), "response_format", "not supported"),
        ("chat/completions", chat({"role": "robot", "content": "hi"}), "messages[0].role", "system"),
        ("chat/completions", chat({"role": "tool", "content": "hi"}), "messages[0].role", "system"),
        ("chat/completions", chat({"role": "user", "content": "hi", "name": "bob"}), "messages[0].name",
         "not a field this server implements"),
        ("chat/completions", chat({"role": "user", "content": [{"type": "image_url", "image_url": {"url": LONG}}]}),
         "messages[0].content[0].type", "must be text"),
        ("chat/completions", chat({"role": "user", "content": LONG}, max_completion_tokens=0), "max_completion_tokens",
         ">= 1"),
    ],
)  # fmt: skip
def test_bad_values_get_400_naming_the_field(http, path, body, param, words):
    error = assert_openai_error(http.post(f"/v1/{path}", json=body), 400, param)
    assert words in error["message"] and error["type"] == "invalid_request_error", error


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        ('{"model": "fake", "prompt": "hello", "max_tokens": 2, "temperature": Infinity}', "temperature"),
        (
            '{"model": "fake", "prompt": "hello", "max_tokens": 2, "repetition_penalty": Infinity}',
            "repetition_penalty",
        ),
        ('{"model": "fake", "prompt": "hello", "max_tokens": 2, "top_p": NaN}', "top_p"),
        ('{"model": "fake", "prompt": "x\\ud800y", "max_tokens": 2}', "prompt"),
        ('{"model": "fake", "prompt": "hello", "max_tokens": 2, "stop": ["a", "\\udfff"]}', "stop[1]"),
        ('{"model": "fake", "prompt": "hello", "max_tokens": 2, "user": "\\ud800"}', "user"),
    ],
)
def test_non_finite_numbers_and_lone_surrogates_get_400(http, raw, param):
    r = http.post("/v1/completions", content=raw.encode(), headers={"content-type": "application/json"})
    assert_openai_error(r, 400, param)


def test_lone_surrogate_in_chat_names_the_message(http):
    raw = '{"model": "fake", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}, ' \
          '{"role": "user", "content": "a\\ud83db"}]}'  # fmt: skip
    r = http.post("/v1/chat/completions", content=raw.encode(), headers={"content-type": "application/json"})
    error = assert_openai_error(r, 400, "messages[1].content")
    assert "lone surrogate" in error["message"]


def test_harmless_and_empty_fields_are_accepted(http):
    body = completion(user="me", metadata={"team": "a"}, store=False, logit_bias=None, tools=[], suffix=None,
                      response_format={"type": "text"}, tool_choice="none")  # fmt: skip
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2
    message = {"role": "assistant", "content": "earlier", "refusal": None, "tool_calls": []}
    r = http.post("/v1/chat/completions", json=chat({"role": "user", "content": "hi"}, message))
    assert r.status_code == 200, r.text


# ---- HTTP: bodies that do not parse, routes and methods ------------------------------------------
@pytest.mark.parametrize(
    ("content", "content_type", "words"),
    [
        (b'{"model": "fake", "prompt": }', "application/json", "not valid JSON"),
        (b'{"model": "fake", "prompt": "caf\xe9"}', "application/json", "UTF-8"),
        (b'{"model": "fake", "prompt": "hello"}', "text/plain", "JSON object"),
        (b"", "application/json", "JSON object"),
        (b"[1, 2]", "application/json", "JSON object"),
    ],
)
def test_bodies_that_do_not_parse_get_400_without_a_param(http, content, content_type, words):
    r = http.post("/v1/completions", content=content, headers={"content-type": content_type})
    error = assert_openai_error(r, 400, None)
    assert words in error["message"], error


def test_unknown_route_and_method_answer_in_the_openai_shape(http):
    assert_openai_error(http.post("/v1/nope", json={}), 404, None)
    error = assert_openai_error(http.get("/v1/completions"), 405, None)
    assert error["code"] == "method_not_allowed"


def test_body_over_the_limit_gets_413(http):
    big = b'{"model": "fake", "prompt": "' + b"x" * DEFAULT_MAX_BODY_BYTES + b'"}'
    r = http.post("/v1/completions", content=big, headers={"content-type": "application/json"})
    error = assert_openai_error(r, 413, None)
    assert "limits.max_body_bytes" in error["message"] and error["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit counts the streamed bytes
        yield b'{"model": "fake", "prompt": "'
        for _ in range(9):
            yield b"y" * (1 << 20)
        yield b'"}'

    r = http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert_openai_error(r, 413, None)


def test_service_answers_after_bad_requests(http):
    r = http.post("/v1/completions", json=completion(max_tokens=3))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


# ---- gRPC ------------------------------------------------------------------------------------------
def grpc_request(model: str = "fake", prompt: str = "hello", **params) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model=model, prompt=prompt, params=pb.SamplingParams(**{"max_tokens": 2, **params})
    )


def grpc_chat(role: str) -> pb.GenerateRequest:
    messages = pb.ChatMessages(messages=[pb.ChatMessage(role=role, content="hi")])
    return pb.GenerateRequest(model="fake", messages=messages, params=pb.SamplingParams(max_tokens=2))


@pytest.mark.parametrize(
    ("req", "field"),
    [
        (grpc_request(n=1000), "params.n"),
        (grpc_request(temperature=float("inf")), "params.temperature"),
        (grpc_request(repetition_penalty=float("inf")), "params.repetition_penalty"),
        (grpc_request(top_p=float("nan")), "params.top_p"),
        (grpc_request(max_tokens=4_000_000_000), "params.max_tokens"),
        (grpc_request(stop=[f"s{i}" for i in range(1000)]), "params.stop"),
        (grpc_request(stop=["x" * 300]), "params.stop[0]"),
        (grpc_chat("robot"), "messages[0].role"),
        (grpc_request(prompt="x" * 2_000_001), "prompt"),
    ],
)
@pytest.mark.parametrize("streaming", [False, True])
def test_grpc_bad_values_get_invalid_argument(stub, req, field, streaming):
    with pytest.raises(grpc.RpcError) as info:
        if streaming:
            list(stub.GenerateStream(req, timeout=60))
        else:
            stub.Generate(req, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
    assert info.value.details().startswith(f"{field} ") or info.value.details().startswith(f"{field}: "), (
        info.value
    )
    assert len(info.value.details()) <= MAX_MESSAGE_CHARS + len(field) + 2


def _bad_utf8() -> bytes:
    good = grpc_request(prompt="hello-there").SerializeToString()
    return good.replace(b"hello-there", b"hello\xffthere")


@pytest.mark.parametrize(
    ("payload", "reason"),
    [(b"\xff\xff\xff\xff\xff", "corrupt"), (_bad_utf8(), "UTF-8"), (b"\x12\x40short", "")],
)
@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
def test_grpc_undecodable_bytes_get_invalid_argument(cluster, payload, reason, method):
    with grpc.insecure_channel(cluster.grpc_target) as channel:
        path = f"/shardserve.v1.LLMService/{method}"
        ident = lambda b: b  # noqa: E731 -- identity (de)serializer: send the bytes as they are
        if method == "Generate":
            call = channel.unary_unary(path, request_serializer=ident, response_deserializer=ident)
            run = lambda: call(payload, timeout=60)  # noqa: E731
        else:
            call = channel.unary_stream(path, request_serializer=ident, response_deserializer=ident)
            run = lambda: list(call(payload, timeout=60))  # noqa: E731
        with pytest.raises(grpc.RpcError) as info:
            run()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
    assert "shardserve.v1.LLMService" in info.value.details() and reason in info.value.details()


def test_grpc_answers_after_bad_requests(stub):
    resp = stub.Generate(grpc_request(), timeout=60)
    assert resp.num_tokens == 2 and resp.finish_reason == "length"
    resp = stub.Generate(grpc_chat("developer"), timeout=60)
    assert resp.num_tokens == 2

"""Named API keys with per-key rate limits, the tenant, and prompt logging, on real Ingresses.

Two more Serve applications run in front of the session app's LLMServer deployments, each with
its own HTTP route prefix and its own gRPC port (every Ingress runs its own gRPC server):
  - `tenants`: keys alice (inline, 3 requests a minute), bob (key_file), carol (key_env, set
    in the Ingress's runtime_env) and dave (60 tokens a minute); log_prompts off (the default);
  - `chatty`: the same keys file for bob, log_prompts on — the positive control of the log test.
Both are deleted at the end.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import grpc
import openai
import pytest
import requests
from ports import free_port
from shardserve.cluster.proto import llm_pb2 as pb
from shardserve.cluster.proto import llm_pb2_grpc as rpc

pytestmark = pytest.mark.slow
ALICE, BOB, CAROL = "sk-alice-0123456789", "sk-bob-0123456789", "sk-carol-0123456789"
ALICE_PER_MINUTE = 3
DAVE = "sk-dave-0123456789"
DAVE_TOKENS_PER_MINUTE = 60  # one token a second back


def _deploy(cluster, name: str, auth: dict, log_prompts: bool, env: dict[str, str]) -> tuple[str, str]:
    from ray import serve
    from shardserve.cluster.ingress.deployment import Ingress

    config = cluster.config.model_dump(mode="json", exclude={"ray"})
    port = free_port(taken=(cluster.config.http.port, cluster.config.grpc.port))
    config.update(grpc={"port": port}, auth=auth, log_prompts=log_prompts)
    handles = {m.name: cluster.llm_handle(m.name) for m in cluster.config.models}
    options = {"num_cpus": 0, "runtime_env": {"env_vars": env}}
    ingress = serve.deployment(Ingress).options(name="Ingress", ray_actor_options=options)
    serve.run(ingress.bind(config, handles), name=name, route_prefix=f"/{name}")
    return f"{cluster.http_url}/{name}", f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def apps(cluster, tmp_path_factory):
    from ray import serve

    bob_file = tmp_path_factory.mktemp("keys") / "bob"
    bob_file.write_text(BOB + "\n")
    auth = {"api_keys": [
        {"name": "alice", "key": ALICE, "requests_per_minute": ALICE_PER_MINUTE},
        {"name": "bob", "key_file": str(bob_file)},
        {"name": "carol", "key_env": "SHARDSERVE_TEST_CAROL_KEY"},
        {"name": "dave", "key": DAVE, "tokens_per_minute": DAVE_TOKENS_PER_MINUTE},
    ]}  # fmt: skip
    env = {"SHARDSERVE_TEST_CAROL_KEY": CAROL}
    try:
        tenants = _deploy(cluster, "tenants", auth, False, env)
        chatty = _deploy(cluster, "chatty", auth, True, env)
        yield {"tenants": tenants, "chatty": chatty}
    finally:
        for name in ("tenants", "chatty"):
            serve.delete(name)


def _complete(base: str, key: str, prompt: str = "keys") -> requests.Response:
    body = {"model": "solo", "prompt": prompt, "max_tokens": 2}
    return requests.post(f"{base}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def test_each_named_key_works_and_others_are_refused(apps):
    http, target = apps["tenants"]
    for key in (BOB, CAROL):
        r = _complete(http, key)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text
    for bad in ("sk-nobody-0123456789", ALICE + "x"):
        r = _complete(http, bad)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key" and bad not in r.text
    models = openai.OpenAI(base_url=f"{http}/v1", api_key=CAROL, max_retries=0).models.list()
    assert "solo" in {m.id for m in models.data}
    req = pb.GenerateRequest(model="solo", prompt="keys", params=pb.SamplingParams(max_tokens=2))
    with grpc.insecure_channel(target) as channel:
        stub = rpc.LLMServiceStub(channel)
        assert stub.Generate(req, metadata=[("authorization", f"Bearer {BOB}")], timeout=30).num_tokens == 2
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(req, metadata=[("authorization", "Bearer sk-nobody-0123456789")], timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_rate_limit_is_per_key_429_with_retry_after(apps):
    http, target = apps["tenants"]
    # alice's bucket holds 3 requests and refills one per 20 s: the 4th in a row is refused.
    statuses = [_complete(http, ALICE).status_code for _ in range(ALICE_PER_MINUTE)]
    assert statuses == [200] * ALICE_PER_MINUTE
    refused = _complete(http, ALICE)
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded" and "alice" in error["message"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 60 // ALICE_PER_MINUTE
    with pytest.raises(openai.RateLimitError):
        openai.OpenAI(base_url=f"{http}/v1", api_key=ALICE, max_retries=0).completions.create(
            model="solo", prompt="x", max_tokens=2
        )
    # The same bucket on gRPC (one process, one bucket); bob is not limited.
    req = pb.GenerateRequest(model="solo", prompt="keys", params=pb.SamplingParams(max_tokens=2))
    with grpc.insecure_channel(target) as channel:
        stub = rpc.LLMServiceStub(channel)
        for call in (stub.Generate.with_call, lambda r, **kw: list(stub.GenerateStream(r, **kw))):
            with pytest.raises(grpc.RpcError) as err:
                call(req, metadata=[("authorization", f"Bearer {ALICE}")], timeout=30)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "alice" in err.value.details()
            assert 1 <= int(dict(err.value.trailing_metadata())["retry-after"]) <= 60 // ALICE_PER_MINUTE
        assert stub.Generate(req, metadata=[("authorization", f"Bearer {BOB}")], timeout=30).num_tokens == 2
    assert _complete(http, BOB).status_code == 200


def test_token_budget_counts_prompt_and_max_tokens(apps):
    """dave's bucket holds 60 tokens (one back per second). A request takes max_tokens x n when
    admitted and its prompt's tokens (the fake engine: one per character) once the engine counted
    them; so after 20 + 30 tokens a request for 40 is refused, which it would not be if the prompt
    went uncounted (60 - 20 + refill >= 40)."""
    http, target = apps["tenants"]
    headers = {"Authorization": f"Bearer {DAVE}"}

    def complete(max_tokens: int, prompt: str = "t", n: int = 1) -> requests.Response:
        body = {"model": "solo", "prompt": prompt, "max_tokens": max_tokens, "n": n}
        return requests.post(f"{http}/v1/completions", json=body, headers=headers, timeout=30)

    too_big = complete(max_tokens=31, n=2)  # 62 > 60: no wait would ever admit it
    assert too_big.status_code == 400 and too_big.json()["error"]["param"] == "max_tokens", too_big.text
    assert "tokens_per_minute" in too_big.json()["error"]["message"]
    first = complete(max_tokens=20, prompt="p" * 30)
    assert first.status_code == 200 and first.json()["usage"]["prompt_tokens"] == 30, first.text
    refused = complete(max_tokens=40)
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and "dave" in error["message"] and "tokens per minute" in error["message"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 31
    # The same bucket on gRPC; a small request still fits.
    req = pb.GenerateRequest(model="solo", prompt="keys", params=pb.SamplingParams(max_tokens=40))
    with grpc.insecure_channel(target) as channel:
        stub = rpc.LLMServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(req, metadata=[("authorization", f"Bearer {DAVE}")], timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "dave" in err.value.details()
        assert 1 <= int(dict(err.value.trailing_metadata())["retry-after"]) <= 31
    assert complete(max_tokens=2).status_code == 200


def _serve_logs() -> str:
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
    return "\n".join(p.read_text(errors="replace") for p in logs.glob("*.log"))


def _wait_for_log(needle: str, timeout_s: float = 30) -> str:
    end = time.monotonic() + timeout_s
    while True:
        text = _serve_logs()
        if needle in text or time.monotonic() > end:
            return text
        time.sleep(0.5)


def test_prompts_are_not_logged_unless_enabled(apps):
    quiet, loud = f"quiet-marker-{uuid.uuid4().hex}", f"loud-marker-{uuid.uuid4().hex}"
    assert _complete(apps["tenants"][0], BOB, prompt=quiet).status_code == 200
    with grpc.insecure_channel(apps["tenants"][1]) as channel:
        req = pb.GenerateRequest(model="solo", prompt=quiet, params=pb.SamplingParams(max_tokens=2))
        assert rpc.LLMServiceStub(channel).Generate(req, metadata=[("authorization", f"Bearer {BOB}")]).num_tokens == 2
    assert _complete(apps["chatty"][0], BOB, prompt=loud).status_code == 200
    text = _wait_for_log(loud)
    assert loud in text  # the control: log_prompts on logs the prompt, with its tenant
    assert any(loud in line and "tenant=bob" in line for line in text.splitlines())
    # The quiet app logged the requests (tenant and size), but not their text; keys never appear.
    assert sum("tenant=bob" in line and f"prompt={len(quiet)} chars" in line for line in text.splitlines()) >= 2
    assert quiet not in text
    for key in (ALICE, BOB, CAROL):
        assert key not in text

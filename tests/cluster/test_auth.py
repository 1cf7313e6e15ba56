"""API key: with SHARDSERVE_API_KEY set in the Ingress process, HTTP needs `Authorization:
Bearer <key>` (401 in the OpenAI error shape otherwise, /health open) and gRPC needs the
`authorization` metadata (UNAUTHENTICATED otherwise, Health open).

A second Serve application, `secured`, runs an Ingress with the key in its runtime_env, in front
of the session app's LLMServer deployments (HTTP under /secured, gRPC on its own port: every
Ingress runs its own gRPC server). It is deleted at the end. Named keys: test_api_keys.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import openai
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ports import free_port
from shardserve.cluster.proto import llm_pb2 as pb
from shardserve.cluster.proto import llm_pb2_grpc as rpc

pytestmark = pytest.mark.slow
APP = "secured"
KEY = "sk-test-7f3a9c"


@dataclass
class Secured:
    http_url: str
    grpc_target: str  # the secured app's own gRPC server
    cluster_grpc_target: str  # the session app's (open)


@pytest.fixture(scope="module")
def secured(cluster):
    from ray import serve
    from shardserve.cluster.ingress.deployment import Ingress
    from shardserve.workers.env_overrides import API_KEY_ENV

    handles = {m.name: cluster.llm_handle(m.name) for m in cluster.config.models}
    options = {"num_cpus": 0.1, "runtime_env": {"env_vars": {API_KEY_ENV: KEY}}}
    ingress = serve.deployment(Ingress).options(name="Ingress", ray_actor_options=options)
    config = cluster.config.model_dump(mode="json", exclude={"ray"})
    config["grpc"]["port"] = free_port(taken=(cluster.config.http.port, cluster.config.grpc.port))
    serve.run(ingress.bind(config, handles), name=APP, route_prefix="/secured")
    try:
        yield Secured(cluster.http_url, f"127.0.0.1:{config['grpc']['port']}", cluster.grpc_target)
    finally:
        serve.delete(APP)


def test_http_needs_the_bearer_key(secured):
    url = secured.http_url + "/secured/v1/completions"
    body = {"model": "solo", "prompt": "auth", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = requests.post(url, json=body, headers=headers, timeout=30)
        assert r.status_code == 401, (headers, r.text)
        error = r.json()["error"]
        assert error["code"] == "invalid_api_key" and KEY not in r.text
    assert requests.get(secured.http_url + "/secured/v1/models", timeout=30).status_code == 401
    ok = requests.post(url, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
    assert requests.get(secured.http_url + "/secured/health", timeout=30).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=secured.http_url + "/secured/v1", api_key="nope", max_retries=0).models.list()
    models = openai.OpenAI(base_url=secured.http_url + "/secured/v1", api_key=KEY, max_retries=0).models.list()
    assert "solo" in {m.id for m in models.data}
    # The session app has no key configured and stays open.
    assert requests.post(secured.http_url + "/v1/completions", json=body, timeout=30).status_code == 200


def test_grpc_needs_the_bearer_metadata(secured):
    req = pb.GenerateRequest(model="solo", prompt="auth", params=pb.SamplingParams(max_tokens=2))
    app: list[tuple[str, str]] = []  # no `application` metadata: this port is the secured app's own
    with grpc.insecure_channel(secured.grpc_target) as channel:
        stub = rpc.LLMServiceStub(channel)
        for metadata in (app, [*app, ("authorization", "Bearer wrong")]):
            for call in (stub.Generate, lambda r, **kw: list(stub.GenerateStream(r, **kw))):
                with pytest.raises(grpc.RpcError) as err:
                    call(req, metadata=metadata)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value.details()
            with pytest.raises(grpc.RpcError) as err:
                stub.ListModels(pb.ListModelsRequest(), metadata=metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        good = [*app, ("authorization", f"Bearer {KEY}")]
        assert stub.Generate(req, metadata=good).num_tokens == 2
        assert "".join(p.text for p in stub.GenerateStream(req, metadata=good)) == stub.Generate(req, metadata=good).text
        assert stub.Health(pb.HealthRequest(), metadata=app).ok
        # grpc.health.v1 stays open too (probes carry no key).
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="solo"), timeout=10)
        assert health.status in (health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING)
    # The session app, on its own port, has no key and stays open.
    with grpc.insecure_channel(secured.cluster_grpc_target) as channel:
        assert rpc.LLMServiceStub(channel).Generate(req, timeout=30).num_tokens == 2

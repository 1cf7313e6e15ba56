"""Standard gRPC services on the session app's gRPC port: grpc.health.v1 (per-model status) and
server reflection v1 (what grpcurl asks first) and v1alpha, through real gRPC clients.

`fragile` is left alone here (test_unavailable.py kills its engine), so its status is not asserted.
"""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from shardserve.cluster.proto import llm_pb2 as pb

pytestmark = pytest.mark.slow
SERVING = health_pb2.HealthCheckResponse.SERVING
REFLECTION_V1 = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"


def check(stub, service: str, deadline_s: float = 60.0):
    """The status of `service` once the Ingress's first health round is in (NOT_SERVING before)."""
    end = time.monotonic() + deadline_s
    while True:
        status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
        if status == SERVING or time.monotonic() > end:
            return status
        time.sleep(0.5)


def test_health_check_per_model_and_overall(cluster):
    with grpc.insecure_channel(cluster.grpc_target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("solo", "fake", "tiny-queue", "merged", "shardserve.v1.LLMService"):
            assert check(stub, service) == SERVING, service
        with pytest.raises(grpc.RpcError) as err:
            stub.Check(health_pb2.HealthCheckRequest(service="no-such-model"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        watch = stub.Watch(health_pb2.HealthCheckRequest(service="no-such-model"), timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        watch.cancel()
        watch = stub.Watch(health_pb2.HealthCheckRequest(service="solo"), timeout=10)
        assert next(watch).status == SERVING
        watch.cancel()


def test_health_overall_follows_the_models(cluster):
    # "" and LLMService are SERVING exactly when every model is. `fragile` may be dead or restarting
    # when test_unavailable.py ran first: then both must read NOT_SERVING. Statuses change only at a
    # health round (every 2 s), so a few tries find one round's snapshot.
    models = [m.name for m in cluster.config.models]
    with grpc.insecure_channel(cluster.grpc_target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        check(stub, "solo")  # the first round is in
        for _ in range(3):
            ask = ["", "shardserve.v1.LLMService", *models, ""]
            got = [stub.Check(health_pb2.HealthCheckRequest(service=s), timeout=10).status for s in ask]
            if got[0] == got[-1]:
                break
        overall, service, per_model = got[0], got[1], got[2:-1]
        assert overall == service == (SERVING if all(s == SERVING for s in per_model) else
                                      health_pb2.HealthCheckResponse.NOT_SERVING), list(zip(ask, got, strict=True))


def _list_services(responses) -> set[str]:
    return {s.name for r in responses for s in r.list_services_response.service}


def test_reflection_v1_and_v1alpha(cluster):
    ask = [reflection_pb2.ServerReflectionRequest(list_services="")]
    with grpc.insecure_channel(cluster.grpc_target) as channel:
        # v1 on the wire: the same messages as v1alpha under the grpc.reflection.v1 package.
        v1 = channel.stream_stream(
            REFLECTION_V1,
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        names = _list_services(v1(iter(ask), timeout=10))
        assert {"shardserve.v1.LLMService", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"} <= names
        alpha = reflection_pb2_grpc.ServerReflectionStub(channel)
        assert "shardserve.v1.LLMService" in _list_services(alpha.ServerReflectionInfo(iter(ask), timeout=10))
        # The descriptors come back too: enough for grpcurl to build a GenerateRequest.
        symbol = [reflection_pb2.ServerReflectionRequest(file_containing_symbol="shardserve.v1.LLMService")]
        (reply,) = list(v1(iter(symbol), timeout=10))
        files = reply.file_descriptor_response.file_descriptor_proto
        assert files and any(b"GenerateRequest" in f for f in files)
        # The LLMService still answers on the same port.
        from shardserve.cluster.proto import llm_pb2_grpc as rpc

        models = rpc.LLMServiceStub(channel).ListModels(pb.ListModelsRequest(), timeout=10)
        assert "solo" in {m.name for m in models.models}


def test_banner_grpc_command_runs_as_printed(cluster):
    """`shardserve serve`'s banner: its gRPC line runs the interpreter that runs shardserve."""
    import shlex
    import subprocess
    import sys

    from shardserve.cluster.commands.serve import usage_text

    lines = [s.strip() for s in usage_text(cluster.config).splitlines()]
    (command,) = [s for s in lines if s.startswith(shlex.quote(sys.executable) + " -c ")]
    out = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.split()) == 32  # the fake engine's words for max_tokens=32


def test_ingress_replicas_share_the_grpc_port(cluster):
    """`ingress.num_replicas: 2` on one node: both replicas bind the port (SO_REUSEPORT) and serve."""
    from ray import serve
    from shardserve.cluster.app import INGRESS_ACTOR_OPTIONS
    from shardserve.cluster.ingress.deployment import Ingress
    from shardserve.cluster.testing.ports import free_port

    config = cluster.config.model_dump(mode="json", exclude={"ray"})
    port = free_port(taken=(cluster.config.http.port, cluster.config.grpc.port))
    config.update(grpc={"port": port}, ingress={"num_replicas": 2})
    handles = {m.name: cluster.llm_handle(m.name) for m in cluster.config.models}
    ingress = serve.deployment(Ingress).options(name="Ingress", num_replicas=2, ray_actor_options=INGRESS_ACTOR_OPTIONS)
    serve.run(ingress.bind(config, handles), name="pair", route_prefix="/pair")  # fails unless both bind
    try:
        status = serve.status().applications["pair"].deployments["Ingress"]
        assert status.replica_states.get("RUNNING") == 2, status
        req = pb.GenerateRequest(model="solo", prompt="pair", params=pb.SamplingParams(max_tokens=2))
        from shardserve.cluster.proto import llm_pb2_grpc as rpc

        for _ in range(6):  # new connections: the kernel spreads them over the two listeners
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                assert rpc.LLMServiceStub(channel).Generate(req, timeout=30).num_tokens == 2
    finally:
        serve.delete("pair")
    # Once deleted, the port is closed: the replicas stopped their servers.
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, pytest.raises(grpc.RpcError) as err:
        rpc.LLMServiceStub(channel).Generate(req, timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE

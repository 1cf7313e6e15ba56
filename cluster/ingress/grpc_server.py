"""The gRPC server of one Ingress replica: shardserve.v1.LLMService, grpc.health.v1, reflection.

Data flow: the Ingress constructor calls `GrpcServer.start(...)` on its event loop. It binds
`[::]:<grpc.port>` (TLS / mutual TLS from the `tls` section, else plaintext) and serves:
  - shardserve.v1.LLMService → `LLMServicer` → GrpcFrontend (cluster/ingress/grpc.py) →
    IngressCore, the same handles and router state as the HTTP API in this process;
  - grpc.health.v1.Health (grpcio-health-checking) with a status per model (health.py);
  - server reflection v1 and v1alpha (grpcio-reflection; v1 uses the same messages on the wire,
    grpcio-reflection ships only v1alpha's), so grpcurl and grpcui work without .proto files.
Why our own server and not Ray Serve's gRPC proxy: the proxy binds plaintext only (no TLS option
in Ray 2.60) and offers only its own v1alpha reflection; here TLS, mTLS, health and reflection
are the registry packages used as documented. It also saves the proxy → Ingress hop. Every
Ingress replica binds the same port with SO_REUSEPORT, so `ingress.num_replicas` replicas on one
node share it (the kernel spreads connections); the replicas are placed on the head node
(cluster/app.py), where the Helm chart's gRPC Service points. Hence two applications in one
Ray cluster need different gRPC ports. A cancelled call or an expired deadline cancels the
handler task, which cancels the LLMServer call (GrpcFrontend's `finally`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from shardserve.cluster.config import AppConfig
from shardserve.cluster.ingress.errors import ApiError
from shardserve.cluster.ingress.grpc import GrpcFrontend, details_of
from shardserve.cluster.ingress.grpc_decode import tolerant_registration
from shardserve.cluster.ingress.health import HealthReporter
from shardserve.cluster.ingress.tls import grpc_credentials
from shardserve.cluster.proto import llm_pb2, llm_pb2_grpc

REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
SHUTDOWN_GRACE_S = 5.0

logger = logging.getLogger("ray.serve")


class LLMServicer(llm_pb2_grpc.LLMServiceServicer):
    """LLMService on grpc.aio: GrpcFrontend sets status on the context; streams must abort."""

    def __init__(self, frontend: GrpcFrontend) -> None:
        self.frontend = frontend

    async def Generate(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return await self.frontend.generate(request, context)

    async def GenerateStream(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:  # noqa: N802
        try:
            async for response in self.frontend.generate_stream(request, context):
                yield response
        except ApiError as err:
            await context.abort(err.grpc_status, details_of(err))

    async def ListModels(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return self.frontend.list_models(context)

    async def Health(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return await self.frontend.health(context)


def _add_reflection_v1(servicer: Any, server: grpc.aio.Server) -> None:
    """grpc.reflection.v1 served by the v1alpha servicer: the two protos differ only in package."""
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": handler}),)
    )


class GrpcServer:
    def __init__(self, config: AppConfig, frontend: GrpcFrontend) -> None:
        self.config = config
        self.health = HealthReporter(frontend.core)
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
        # Undecodable request bytes reach GrpcFrontend as INVALID_ARGUMENT (cluster/ingress/grpc_decode.py).
        llm_pb2_grpc.add_LLMServiceServicer_to_server(LLMServicer(frontend), tolerant_registration(self.server))
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, self.server)
        names = [
            llm_pb2.DESCRIPTOR.services_by_name["LLMService"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            REFLECTION_V1,
            reflection.SERVICE_NAME,
        ]
        servicer = reflection.aio.ReflectionServicer(names)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, self.server)
        _add_reflection_v1(servicer, self.server)
        address = f"[::]:{config.grpc.port}"
        if config.tls is not None:
            self.server.add_secure_port(address, grpc_credentials(config.tls))  # binds now: errors raise here
        else:
            self.server.add_insecure_port(address)
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Start serving on the running loop (the Ingress replica's)."""
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self.server.start()), loop.create_task(self.health.run())]
        scheme = "TLS" if self.config.tls is not None else "plaintext"
        logger.info(f"gRPC server listening on port {self.config.grpc.port} ({scheme})")

    async def stop(self) -> None:
        await self.health.servicer.enter_graceful_shutdown()
        for task in self._tasks:
            task.cancel()
        await self.server.stop(SHUTDOWN_GRACE_S)


"""grpc.health.v1 statuses of the Ingress's gRPC server, one per served model.

Data flow: `HealthReporter.run()` (a task on the gRPC server's event loop) asks every model's
LLMServer for its health through `IngressCore.health()` every HEALTH_PERIOD_S and sets, in the
registry's `grpc_health.v1` HealthServicer (grpcio-health-checking: Check, Watch and List as the
standard defines them): each model name → SERVING when its engine answers "ok", else NOT_SERVING;
"" (the whole server) and `shardserve.v1.LLMService` → SERVING only when every model is. Check on
a name that is none of these answers NOT_FOUND, Watch answers SERVICE_UNKNOWN (the standard's
rules). Until the first round finishes every name reads NOT_SERVING.
"""

from __future__ import annotations

import asyncio
import logging

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio
from shardserve.cluster.ingress.core import IngressCore

HEALTH_PERIOD_S = 2.0
LLM_SERVICE = "shardserve.v1.LLMService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

logger = logging.getLogger(__name__)


class HealthReporter:
    def __init__(self, core: IngressCore) -> None:
        self.core = core
        self.servicer = health_aio.HealthServicer()

    def names(self) -> list[str]:
        return ["", LLM_SERVICE, *self.core.model_names]

    async def refresh(self) -> None:
        statuses = await self.core.health()
        for name, status in statuses.items():
            await self.servicer.set(name, SERVING if status == "ok" else NOT_SERVING)
        overall = SERVING if all(s == "ok" for s in statuses.values()) else NOT_SERVING
        await self.servicer.set("", overall)
        await self.servicer.set(LLM_SERVICE, overall)

    async def run(self) -> None:
        for name in self.names():
            await self.servicer.set(name, NOT_SERVING)
        while True:
            try:
                await self.refresh()
            except Exception:  # a round that fails leaves the last statuses; the next one retries
                logger.exception("health round failed")
            await asyncio.sleep(HEALTH_PERIOD_S)

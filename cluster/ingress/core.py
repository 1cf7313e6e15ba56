"""IngressCore: what the HTTP and gRPC front ends share — model lookup, streaming, errors.

Data flow: a front end builds a `GenerateRequest` and calls `core.stream(request)`. The core
finds the model's LLMServer handle (unknown model → ApiError NOT_FOUND), calls
`generate` as a streaming handle call (the prefix-affinity router picks the replica), and
re-yields its `GenerateChunk`s, turning an error chunk or a Ray Serve failure into an ApiError.
When the consumer stops early (client disconnect, gRPC cancel or deadline) the `finally`
cancels the handle call; Ray Serve cancels the replica's generator, which aborts the request
in the engine. `first_chunk()` lets a front end wait for the first chunk (so errors still get
a proper status) before committing response headers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from shardserve.cluster.config import AppConfig, ModelSection
from shardserve.cluster.ingress.errors import ApiError, from_serve_exception, unknown_model
from shardserve.cluster.messages import ErrorKind, GenerateChunk, GenerateRequest

HEALTH_TIMEOUT_S = 5.0


class IngressCore:
    def __init__(self, config: AppConfig, handles: dict[str, Any]) -> None:
        self.config = config
        self.handles = handles  # model name -> DeploymentHandle of its LLMServer
        self.created = int(time.time())

    @property
    def model_names(self) -> list[str]:
        return [m.name for m in self.config.models]

    def model(self, name: str | None) -> ModelSection:
        if not name:
            raise ApiError(ErrorKind.INVALID_ARGUMENT, f"model is required; served models: {self.model_names}", "model")
        try:
            return self.config.model(name)
        except KeyError:
            raise unknown_model(name, self.model_names) from None

    async def stream(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        self.model(request.model)
        handle = self.handles[request.model]
        response = handle.options(stream=True).generate.remote(request)
        finished = False
        try:
            async for chunk in response:
                if chunk.error is not None:
                    raise ApiError.from_info(chunk.error)
                finished = chunk.finished
                yield chunk
        except ApiError:
            raise
        except Exception as err:
            mapped = from_serve_exception(err)
            if mapped is None:
                raise
            raise mapped from err
        finally:
            if not finished:
                response.cancel()

    async def first_chunk(
        self, request: GenerateRequest
    ) -> tuple[GenerateChunk, AsyncIterator[GenerateChunk]]:
        """The first chunk (errors raise here) and an iterator over the rest."""
        stream = self.stream(request)
        try:
            first = await stream.__anext__()
        except BaseException:
            await stream.aclose()
            raise
        return first, stream

    async def health(self) -> dict[str, str]:
        async def one(name: str) -> str:
            try:
                reply = await asyncio.wait_for(self.handles[name].health.remote(), HEALTH_TIMEOUT_S)
                return reply["status"]
            except asyncio.TimeoutError:
                return f"no replica answered within {HEALTH_TIMEOUT_S}s"
            except Exception as err:
                return f"unavailable: {type(err).__name__}"

        statuses = await asyncio.gather(*(one(name) for name in self.model_names))
        return dict(zip(self.model_names, statuses, strict=True))

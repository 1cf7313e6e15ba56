"""IngressCore: what the HTTP and gRPC front ends share — model lookup, streaming, errors.

Data flow: a front end builds a `GenerateRequest` and calls `core.stream(request)`. The core
finds the model's LLMServer handle (unknown model → ApiError NOT_FOUND), calls
`generate` as a streaming by-value handle call (the prefix-affinity router picks the replica;
no Ray object per chunk) or, with the model's `direct_stream`, straight to the replica the router
picks, on its own port (direct.py), and re-yields its `GenerateChunk`s, turning an error chunk or
a Ray Serve failure into an ApiError. When the consumer stops early (client disconnect, gRPC
cancel or deadline) the call is cancelled, which cancels the replica's generator and so aborts
the request in the engine.
That cancel must not depend on an async generator being closed (Starlette leaves a streaming
body suspended when its task is cancelled, and anyio re-cancels any await in a `finally`), so
`stream()` returns a `ChunkStream`, a plain async iterator whose `cancel()` is synchronous and
idempotent: it cancels on CancelledError inside `__anext__`, on an error chunk, and whenever a
front end's response ends for any reason. `first_chunk()` lets a front end wait for the first
chunk (so errors still get a proper status) before committing response headers.
`health()` asks every model's LLMServer, except one scaled to zero (min_replicas 0, no replica
running: cluster/replicas.py), which is "ok" without a call, since a call would wake it; a request
to such a model makes `Waker` start a replica at once (cluster/ingress/wake.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from shardserve.cluster.config import AppConfig, ModelSection
from shardserve.cluster.direct_stream import DirectClient
from shardserve.cluster.ingress.auth import Gate
from shardserve.cluster.ingress.direct import DirectResponse
from shardserve.cluster.ingress.errors import ApiError, from_serve_exception, unknown_model
from shardserve.cluster.ingress.wake import Waker
from shardserve.cluster.messages import ErrorKind, GenerateChunk, GenerateRequest
from shardserve.cluster.replicas import running_replicas

HEALTH_TIMEOUT_S = 5.0


class ChunkStream:
    """The chunks of one LLMServer call; `cancel()` (sync, idempotent) stops it unless it finished.
    `on_first` sees the first chunk (the prompt's token count: the key's token budget)."""

    def __init__(self, response: Any, on_first: Callable[[GenerateChunk], None] | None = None) -> None:
        self._response = response  # DeploymentResponseGenerator
        self._done = False
        self._on_first = on_first

    def __aiter__(self) -> ChunkStream:
        return self

    async def __anext__(self) -> GenerateChunk:
        if self._done:
            raise StopAsyncIteration
        try:
            chunk = await self._response.__anext__()
        except StopAsyncIteration:
            self._done = True
            raise
        except BaseException as err:  # CancelledError included: the caller went away
            self.cancel()
            mapped = from_serve_exception(err) if isinstance(err, Exception) else None
            if mapped is not None:
                raise mapped from err
            raise
        if self._on_first is not None:
            on_first, self._on_first = self._on_first, None
            on_first(chunk)
        if chunk.error is not None:
            self.cancel()
            raise ApiError.from_info(chunk.error)
        if chunk.finished:
            self._done = True
        return chunk

    def cancel(self) -> None:
        if not self._done:
            self._done = True
            self._response.cancel()

    async def aclose(self) -> None:
        self.cancel()


class IngressCore:
    def __init__(
        self,
        config: AppConfig,
        handles: dict[str, Any],
        gate: Gate | None = None,
        deployment_names: dict[str, str] | None = None,
    ) -> None:
        self.config = config
        self.handles = handles  # model name -> DeploymentHandle of its LLMServer
        self.deployment_names = deployment_names or {}  # model name -> its LLMServer deployment
        self.waker = Waker(config, self.deployment_names)  # scale from zero without Serve's metrics delay
        self.gate = gate  # API keys: the per-key token budget is taken here, for both front ends
        self.created = int(time.time())
        self._generate: dict[str, Any] = {}  # model name -> its handle's streaming by-value options, made once
        self._control: dict[str, Any] = {}  # model name -> its handle's unary by-value options, made once
        self._direct = DirectClient()  # idle connections to the replicas' direct-stream ports

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

    def stream(self, request: GenerateRequest) -> ChunkStream:
        model = self.model(request.model)
        self.waker.maybe_wake(request.model)
        generate = self._generate.get(request.model)
        if generate is None:  # made on the first request (on the replica's loop, where Serve's router lives)
            # By value: the call and its chunks go over the replica's own gRPC server (Serve's
            # inter-deployment gRPC), not as a Ray task and one Ray object per chunk.
            generate = self.handles[request.model].options(stream=True, _by_reference=False).generate
            self._generate[request.model] = generate
        on_first = None
        if self.gate is not None and self.gate.admit_tokens(request):  # raises when over the key's budget
            gate, tenant = self.gate, request.tenant
            on_first = lambda chunk: gate.charge_prompt(tenant, chunk.num_prompt_tokens)  # noqa: E731
        deployment = self.deployment_names.get(request.model)
        if model.direct_stream and deployment is not None:  # straight to the replica (direct.py)
            response = DirectResponse(deployment, self._direct, request, lambda: generate.remote(request))
            return ChunkStream(response, on_first)
        return ChunkStream(generate.remote(request), on_first)

    def _by_value(self, name: str) -> Any:
        """The model's handle for unary control calls, by value like `generate` (over the replica's gRPC
        server): a by-reference call is a Ray actor task whose submission held this loop's thread for
        milliseconds under load, and health runs every few seconds (cluster/ingress/health.py)."""
        handle = self._control.get(name)
        if handle is None:
            handle = self._control[name] = self.handles[name].options(_by_reference=False)
        return handle

    async def first_chunk(self, request: GenerateRequest) -> tuple[GenerateChunk, ChunkStream]:
        """The first chunk (errors raise here) and the stream of the rest."""
        stream = self.stream(request)
        try:
            first = await stream.__anext__()
        except BaseException:
            stream.cancel()
            raise
        return first, stream

    async def health(self) -> dict[str, str]:
        async def one(name: str) -> str:
            if await self._scaled_to_zero(name):
                return "ok"  # idle at min_replicas 0: a request starts a replica (calling one would too)
            try:
                reply = await asyncio.wait_for(self._by_value(name).health.remote(), HEALTH_TIMEOUT_S)
                return reply["status"]
            except asyncio.TimeoutError:
                return f"no replica answered within {HEALTH_TIMEOUT_S}s"
            except Exception as err:
                return f"unavailable: {type(err).__name__}"

        statuses = await asyncio.gather(*(one(name) for name in self.model_names))
        return dict(zip(self.model_names, statuses, strict=True))

    async def _scaled_to_zero(self, name: str) -> bool:
        autoscaling = self.config.model(name).autoscaling
        if autoscaling is None or autoscaling.min_replicas > 0 or name not in self.deployment_names:
            return False
        return not await running_replicas(self.deployment_names[name])

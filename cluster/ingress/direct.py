"""The Ingress's direct stream to an LLMServer replica, with Serve's handle as the fallback.

Data flow: IngressCore.stream makes a `DirectResponse` for a model with `direct_stream` on. Its first
`__anext__` asks the model's handle to pick a replica without sending (`choose_replica(...,
_reserve=False)`: our prefix-affinity router ranks the replicas as for a handle call and stamps the
pick), books the choice in that router (in flight until the call ends; the prefix is the replica's),
and opens a call to the replica's direct-stream port (cluster/direct_stream.py) at the node IP Serve
reports. Whatever stops the direct path before the first chunk arrives (a replica with no port
published, a router on another loop, the port refusing: stopping, restarted, gone) sends the
request through the handle instead (`fallback`), where Serve routes and retries as before; a replica
lost after the first chunk ends the stream with UNAVAILABLE, as on the handle path. `cancel()` is
synchronous and idempotent (ChunkStream's contract): it cancels the gRPC call, or the handle call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from shardserve.cluster.direct_stream import METADATA_KEY, DirectClient, DirectStreamError
from shardserve.cluster.ingress.errors import ApiError
from shardserve.cluster.messages import ErrorKind, GenerateChunk, GenerateRequest
from shardserve.cluster.router import router_of

logger = logging.getLogger("ray.serve")


def router_on_this_loop() -> bool:
    """Serve's handle routers run on the caller's loop (SERVE_ENV), so ours can be booked from here."""
    from ray.serve._private.constants import RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP

    return not RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP


class DirectResponse:
    """One generate call: over the direct stream when it can, else through `fallback()` (a handle
    call's DeploymentResponseGenerator)."""

    def __init__(
        self, handle: Any, deployment: str, client: DirectClient, request: GenerateRequest, fallback: Callable[[], Any]
    ) -> None:
        self._handle = handle  # the model's handle, options(method_name="generate", stream=True)
        self._deployment = deployment
        self._client = client
        self._request = request
        self._fallback = fallback
        self._call: Any = None
        self._handle_response: Any = None
        self._cancelled = False

    async def __anext__(self) -> GenerateChunk:
        if self._handle_response is None and self._call is None:
            await self._open()  # may find the call cancelled meanwhile: ends the stream
        if self._handle_response is not None:
            return await self._handle_response.__anext__()
        try:
            chunk = await self._call.read()
        except DirectStreamError as err:
            if err.started or self._cancelled:
                raise ApiError(ErrorKind.UNAVAILABLE, f"replica stream to {self._call.address} failed: {err}") from None
            self._client.forget(self._call.address)  # refused before any chunk: the handle takes it
            logger.info("direct stream to %s refused (%s): through the handle", self._call.address, err)
            self._handle_response = self._fallback()
            return await self._handle_response.__anext__()
        if chunk is None:
            raise StopAsyncIteration
        return chunk

    async def _open(self) -> None:
        if not router_on_this_loop():
            self._handle_response = self._fallback()
            return
        async with self._handle.choose_replica(self._request, _reserve=False) as selection:
            pass
        internal_id = selection._request_metadata.internal_request_id  # the router's key for its choice
        router = router_of(self._deployment)  # made by the first handle call in this process
        port = selection.replica_metadata.get(METADATA_KEY)
        if router is None or not isinstance(port, int) or self._cancelled:
            if router is not None:
                router.drop_decision(internal_id)
            if self._cancelled:
                raise StopAsyncIteration
            self._handle_response = self._fallback()
            return
        self._call = self._client.call(f"{selection.node_ip}:{port}", self._request)
        if not router.on_direct_stream(internal_id, selection.replica_id, self._call):
            self._call.cancel()  # the replica left while we picked it
            self._call = None
            self._handle_response = self._fallback()

    def cancel(self) -> None:
        self._cancelled = True
        if self._call is not None:
            self._call.cancel()
        if self._handle_response is not None:
            self._handle_response.cancel()

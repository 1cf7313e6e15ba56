"""The Ingress's direct stream to an LLMServer replica, with Serve's handle as the fallback.

Data flow: IngressCore.stream makes a `DirectResponse` for a model with `direct_stream` on. Its first
`__anext__` asks this process's prefix-affinity router (cluster/router.py) to rank the model's
replicas for the request, as for a handle call (`pick_direct`: load, prefix affinity, the pick's
stamp), books the choice there (in flight until the call ends; the prefix is the replica's) and
opens a call to the address the replica published (cluster/direct_stream.py). Whatever stops the
direct path before the first chunk arrives (no router in this process yet, or on another loop, no
replica known, none published, the port refusing: stopping, restarted, gone) sends the request
through the handle instead (`fallback`), where Serve routes, waits for replicas and retries as
before; a replica lost after the first chunk ends the stream with UNAVAILABLE, as on the handle
path. `cancel()` is synchronous and idempotent (ChunkStream's contract): it cancels the direct
call, or the handle call.
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
        self, deployment: str, client: DirectClient, request: GenerateRequest, fallback: Callable[[], Any]
    ) -> None:
        self._deployment = deployment
        self._client = client
        self._request = request
        self._fallback = fallback
        self._call: Any = None
        self._handle_response: Any = None
        self._cancelled = False

    async def __anext__(self) -> GenerateChunk:
        if self._handle_response is None and self._call is None:
            self._open()
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

    def _open(self) -> None:
        router = router_of(self._deployment) if router_on_this_loop() else None
        pick = None if router is None else router.pick_direct(self._request)
        address = None if pick is None else pick.ranked[0].replica_metadata.get(METADATA_KEY)
        if router is None or pick is None or not isinstance(address, str):
            self._handle_response = self._fallback()
            return
        self._call = self._client.call(address, self._request)
        router.on_direct_stream(pick, self._call)  # no await since the pick: the replica is still there

    def cancel(self) -> None:
        self._cancelled = True
        if self._call is not None:
            self._call.cancel()
        if self._handle_response is not None:
            self._handle_response.cancel()

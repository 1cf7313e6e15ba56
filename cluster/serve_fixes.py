"""Work-around for a Ray Serve gRPC proxy bug that loses client cancels of streaming calls.

Data flow: Serve's gRPC proxy imports `shardserve.cluster.proto.add_LLMServiceServicer_to_server`
(the servicer function named in `serve.start`'s gRPC options) and calls it with its own server
object, whose `service_handler_factory` builds the proxy handler of every RPC. That function
passes the server through `cancel_safe_streaming(server)` before registering the service, so
each server-streaming handler the factory builds is wrapped by `_cancel_safe_stream`.

The bug (Ray Serve 2.60, `gRPCProxy.send_request_to_replica`): a server-streaming call cancels
its Ingress request only if the client's cancel or deadline interrupts the proxy while it awaits
the next response (`ProxyResponseGenerator.__anext__` then cancels the handle call). If it lands
while the proxy is writing a message to the client — much of the time for a fast token stream
on a busy machine — grpc-aio closes the proxy's generators instead (GeneratorExit at `yield
result`, logged as "Request failed due to unexpected error"); nothing cancels the handle call
and the Ingress keeps streaming, so the engine request runs on to max_tokens holding its KV
blocks long after the client left.

The wrapper runs Serve's handler in a task of its own that only ever waits inside that handler
(each message goes to an unbounded queue without suspending), and hands the messages to grpc
from the queue. However the grpc call ends — client cancel, deadline, normal end — the wrapper
cancels that task, and the cancel always lands where Serve handles it: inside the proxy's await
on the Ingress, which cancels the handle call and so the engine request. The wrapper then waits
for the task to unwind before it returns to grpc. The handler sees the call's context through
`_PeerSnapshotContext`, because after such a cancel Serve reads the peer address for its access
log, and a call ended by a deadline or a client cancel may already be released by then. Unary handlers are left
as they are (grpc awaits them directly, so a cancel always lands inside Serve's awaits).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

_WRAPPED = "_shardserve_cancel_safe_streaming"


class _PeerSnapshotContext:
    """The grpc servicer context as Serve's handler sees it, with `peer()` answered from a copy
    taken when the call started; everything else goes to the real context.

    Why: once the handler is cancelled in its await (above), Serve's proxy runs on to its access
    log, which reads `context.peer()`. When a deadline or a client cancel ended the call, grpc's
    C core may already have released it, and that read crashed the proxy process (SIGSEGV in
    `proxy_request_response.client`, seen in CI on deadline-exceeded streams). The other context
    methods Serve calls (code, details, trailing metadata) only touch Python-side state.
    """

    def __init__(self, context: Any) -> None:
        self._context = context
        self._peer = context.peer()

    def peer(self) -> str:
        return self._peer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def _cancel_safe_stream(handler: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        safe_context = _PeerSnapshotContext(context)

        async def pump() -> None:
            try:
                async for message in handler(request, safe_context):
                    queue.put_nowait(("message", message))
            except asyncio.CancelledError:
                return  # cancelled by `stream` below: nobody reads the queue any more
            except BaseException as err:  # noqa: BLE001 -- handed to the grpc call below
                queue.put_nowait(("error", err))
                return
            queue.put_nowait(("end", None))

        task = asyncio.ensure_future(pump())
        try:
            while True:
                kind, item = await queue.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise item
                yield item
        finally:
            task.cancel()  # a no-op once the handler ended; else the handle call is cancelled
            await asyncio.wait({task})  # the handler's clean-up runs inside this call's lifetime

    return stream


def cancel_safe_streaming(server: Any) -> None:
    """Wrap the server-streaming handlers `server`'s Serve handler factory builds (idempotent)."""
    factory = getattr(server, "service_handler_factory", None)
    if factory is None or getattr(factory, _WRAPPED, False):
        return

    def factory_with_cancel(*args: Any, **kwargs: Any) -> Any:
        handler = factory(*args, **kwargs)
        return _cancel_safe_stream(handler) if inspect.isasyncgenfunction(handler) else handler

    setattr(factory_with_cancel, _WRAPPED, True)
    server.service_handler_factory = factory_with_cancel

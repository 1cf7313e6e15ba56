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
for the task to unwind before it returns to grpc, so the handler never touches the call's
context after grpc has released the call. Unary handlers are left
as they are (grpc awaits them directly, so a cancel always lands inside Serve's awaits).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

_WRAPPED = "_shardserve_cancel_safe_streaming"


def _cancel_safe_stream(handler: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        async def pump() -> None:
            try:
                async for message in handler(request, context):
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
            # Let the handler finish its clean-up before the grpc call ends: Serve's handler reads
            # the call's context as it unwinds (the peer address for its access log), and a read
            # after grpc has released the call crashed the proxy process (SIGSEGV in
            # `context.peer()`, seen in CI on deadline-exceeded streams).
            await asyncio.wait({task})

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

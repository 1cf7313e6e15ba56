"""The gRPC proxy's cancel-safe stream wrapper (cluster/serve_fixes.py), without Ray or grpc.

A stand-in handler plays Serve's: it streams until cancelled and then, as Serve's proxy does,
still reads the call's context while it unwinds. The wrapper must (1) cancel it however the
call ends and (2) return to grpc only after that clean-up ran: grpc releases the call as soon as
the handler returns, and Serve reading the released context crashed the proxy process.
"""

from __future__ import annotations

import asyncio

from shardserve.cluster.serve_fixes import _cancel_safe_stream


class _Context:
    def __init__(self) -> None:
        self.released = False  # grpc has finished the call
        self.reads_after_release = 0

    def peer(self) -> str:
        if self.released:
            self.reads_after_release += 1
        return "ipv4:127.0.0.1:1"


def _handler(log: list[str]):
    async def handler(request, context):
        try:
            for i in range(1_000_000):
                yield i
                await asyncio.sleep(0.001)
        finally:
            log.append("cancelled")
            await asyncio.sleep(0.05)  # Serve's unwinding awaits (cancel the handle call, log)
            context.peer()
            log.append("cleaned up")

    return handler


def test_closing_the_stream_waits_for_the_handler_to_unwind():
    async def run() -> tuple[list[str], _Context]:
        log: list[str] = []
        context = _Context()
        stream = _cancel_safe_stream(_handler(log))(None, context)
        assert [await stream.__anext__() for _ in range(3)] == [0, 1, 2]
        await stream.aclose()  # what grpc does when the client cancels or the deadline passes
        context.released = True
        await asyncio.sleep(0.1)  # anything the handler still did would land now
        return log, context

    log, context = asyncio.run(run())
    assert log == ["cancelled", "cleaned up"]
    assert context.reads_after_release == 0


def test_a_cancelled_consumer_also_waits_for_the_handler():
    async def run() -> tuple[list[str], _Context]:
        log: list[str] = []
        context = _Context()
        stream = _cancel_safe_stream(_handler(log))(None, context)

        async def consume() -> None:
            async for _ in stream:
                pass

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.02)
        task.cancel()  # grpc-aio cancels the handler's task at a deadline
        await asyncio.gather(task, return_exceptions=True)
        await stream.aclose()
        context.released = True
        await asyncio.sleep(0.1)
        return log, context

    log, context = asyncio.run(run())
    assert log == ["cancelled", "cleaned up"]
    assert context.reads_after_release == 0

"""The gRPC proxy's cancel-safe stream wrapper (cluster/serve_fixes.py), without Ray or grpc.

A stand-in handler plays Serve's: it streams until cancelled and then, as Serve's proxy does,
still reads the call's peer address while it unwinds (its access log). A deadline or a client
cancel can release the grpc call before that read, and Serve reading the released call crashed
the proxy process. The wrapper must cancel the handler however the call ends, let its clean-up
finish before returning to grpc, and answer `peer()` without touching the call after it started.
"""

from __future__ import annotations

import asyncio

from shardserve.cluster.serve_fixes import _cancel_safe_stream


class _Context:
    def __init__(self) -> None:
        self.released = False  # grpc's core has finished and released the call
        self.reads_after_release = 0
        self.code_set: object = None

    def peer(self) -> str:
        if self.released:
            self.reads_after_release += 1  # in grpc: a read of freed memory
        return "ipv4:127.0.0.1:1"

    def set_code(self, code: object) -> None:  # Python-side state in grpc-aio: safe at any time
        self.code_set = code


def _handler(log: list[str]):
    async def handler(request, context):
        try:
            for i in range(1_000_000):
                yield i
                await asyncio.sleep(0.001)
        finally:
            log.append("cancelled")
            await asyncio.sleep(0.05)  # Serve's unwinding awaits (cancel the handle call, log)
            assert context.peer() == "ipv4:127.0.0.1:1"
            context.set_code("CANCELLED")
            log.append("cleaned up")

    return handler


def test_closing_the_stream_waits_for_the_handler_to_unwind():
    async def run() -> tuple[list[str], _Context]:
        log: list[str] = []
        context = _Context()
        stream = _cancel_safe_stream(_handler(log))(None, context)
        assert [await stream.__anext__() for _ in range(3)] == [0, 1, 2]
        context.released = True  # the deadline passed: grpc's core is done with the call
        await stream.aclose()  # what grpc then does to the handler
        assert log == ["cancelled", "cleaned up"], "returned to grpc before the handler unwound"
        await asyncio.sleep(0.1)  # anything the handler still did would land now
        return log, context

    log, context = asyncio.run(run())
    assert log == ["cancelled", "cleaned up"]  # cleaned up before aclose returned
    assert context.reads_after_release == 0
    assert context.code_set == "CANCELLED"  # other context calls reach the real context


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
        context.released = True
        task.cancel()  # grpc-aio cancels the handler's task at a deadline
        await asyncio.gather(task, return_exceptions=True)
        await stream.aclose()
        await asyncio.sleep(0.1)
        return log, context

    log, context = asyncio.run(run())
    assert log == ["cancelled", "cleaned up"]
    assert context.reads_after_release == 0

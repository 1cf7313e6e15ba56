"""Adaptive coalescing of a token stream: one message for everything produced since the last send.

Why: every message a Serve deployment yields is a Ray object (LLMServer → Ingress, then Ingress →
proxy), each costing CPU in the sender, the receiver and the proxy; one message per token per
stream saturated those processes and starved the engine thread for the GIL (figures:
benchmarks/README.md, serving rows). Used by the LLMServer when a model's stream interval is > 0
(cluster/server.py): by default on GPUs and off on CPU (with merging on for every model, Ray's
gRPC proxy segfaulted while cancelling streams in CPU CI; cluster/app.py).

`batched(source)` reads `source` in a task of its own and hands the consumer everything that
arrived while it was busy sending the previous message, as one list. Nothing is delayed: an idle
consumer gets each item as soon as it arrives; items pile up only when sending is the bottleneck,
so the message rate falls exactly when it has to. With `min_interval_s` > 0 (a model's
`stream_interval_ms`) the next message waits until that much time has passed — the first and the
last never wait — trading smoothness for fewer messages (vLLM's `stream_interval`).
`merge_chunks` turns such a list of GenerateChunks into one chunk carrying the same text, token
counts, logprobs and final fields.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import TypeVar

from shardserve.cluster.messages import CompletionDelta, GenerateChunk

T = TypeVar("T")


async def batched(source: AsyncIterator[T], min_interval_s: float = 0.0) -> AsyncIterator[list[T]]:
    """Yield lists of the items `source` produced since the previous yield (never empty), at
    most one list per `min_interval_s` except for the first and the final one.

    An exception from `source` is raised after the items that came before it were yielded.
    Closing or cancelling this generator cancels the read of `source` (its own cleanup runs).
    """
    buffer: list[T] = []
    wake = asyncio.Event()
    ended = False
    failure: BaseException | None = None

    async def pump() -> None:
        nonlocal ended, failure
        try:
            async for item in source:
                buffer.append(item)
                wake.set()
        except BaseException as err:  # noqa: BLE001 -- re-raised in the consumer, after the items
            failure = err  # a CancelledError too: unless we cancelled the pump, the source was
        finally:
            ended = True
            wake.set()

    task = asyncio.ensure_future(pump())
    loop = asyncio.get_running_loop()
    next_send = loop.time()  # the first message goes out at once
    try:
        while True:
            while not buffer and not ended:
                wake.clear()
                await wake.wait()
            while buffer and not ended and loop.time() < next_send:  # hold on until the interval is up
                wake.clear()
                try:
                    await asyncio.wait_for(wake.wait(), timeout=next_send - loop.time())
                except asyncio.TimeoutError:
                    break
            if buffer:
                next_send = loop.time() + min_interval_s
                items = buffer[:]
                buffer.clear()
                yield items
            elif failure is not None:
                raise failure
            else:
                return
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # let the source's own cleanup run; raises only if we are cancelled


def merge_chunks(chunks: Sequence[GenerateChunk]) -> GenerateChunk:
    """One chunk equivalent to `chunks` (consecutive chunks of one request, oldest first).

    Per completion index: texts concatenated, token counts summed, logprobs concatenated, the last
    finish reason. The request-level fields come from the last chunk (finished, error, counts),
    prompt logprobs from the chunk that carried them (only ever the first that had them).
    """
    if len(chunks) == 1:
        return chunks[0]
    by_index: dict[int, list[CompletionDelta]] = {}
    for chunk in chunks:
        for delta in chunk.deltas:
            by_index.setdefault(delta.index, []).append(delta)
    last = chunks[-1]
    return GenerateChunk(
        request_id=last.request_id,
        replica_id=last.replica_id,
        deltas=tuple(_merge_deltas(index, deltas) for index, deltas in by_index.items()),
        finished=last.finished,
        num_prompt_tokens=last.num_prompt_tokens,
        num_cached_prompt_tokens=last.num_cached_prompt_tokens,
        error=next((c.error for c in chunks if c.error is not None), None),
        prompt_logprobs=next((c.prompt_logprobs for c in chunks if c.prompt_logprobs is not None), None),
        cost_usd=last.cost_usd,
    )


def _merge_deltas(index: int, deltas: list[CompletionDelta]) -> CompletionDelta:
    if len(deltas) == 1:
        return deltas[0]
    logprobs = None
    if any(d.logprobs is not None for d in deltas):
        logprobs = tuple(p for d in deltas for p in (d.logprobs or ()))
    return CompletionDelta(
        index=index,
        text="".join(d.text for d in deltas),
        num_tokens=sum(d.num_tokens for d in deltas),
        finish_reason=next((d.finish_reason for d in reversed(deltas) if d.finish_reason), None),
        logprobs=logprobs,
    )

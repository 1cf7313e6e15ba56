"""Coalescing of streamed chunks (cluster/streaming.py): deterministic, no Ray.

The serving path must not fall back to one message per token when it cannot keep up: these tests
pin that everything produced while the consumer was busy goes out as one merged message, that an
idle consumer still gets the first item at once, and that merging loses no text, tokens, logprobs
or final fields.
"""

from __future__ import annotations

import asyncio

import pytest
from shardserve.cluster.messages import (
    CompletionDelta,
    ErrorInfo,
    ErrorKind,
    GenerateChunk,
    PositionLogprob,
    TokenLogprob,
)
from shardserve.cluster.streaming import batched, merge_chunks


async def _source(queue: asyncio.Queue):
    while True:
        item = await queue.get()
        if item is None:
            return
        if isinstance(item, Exception):
            raise item
        yield item


def test_items_produced_while_the_consumer_is_busy_go_out_together():
    async def run() -> list[list[int]]:
        queue: asyncio.Queue = asyncio.Queue()
        sent: list[list[int]] = []
        release = asyncio.Event()

        async def consume() -> None:
            async for items in batched(_source(queue)):
                sent.append(items)
                if len(sent) == 1:
                    await release.wait()  # a slow send: the next 50 items pile up meanwhile

        task = asyncio.create_task(consume())
        queue.put_nowait(0)
        for _ in range(5):
            await asyncio.sleep(0)
        assert sent == [[0]]  # the first item was not held back waiting for more
        for i in range(1, 51):
            queue.put_nowait(i)
        for _ in range(5):
            await asyncio.sleep(0)
        release.set()
        queue.put_nowait(None)
        await asyncio.wait_for(task, 5)
        return sent

    sent = asyncio.run(run())
    assert sent == [[0], list(range(1, 51))]  # two messages for 51 items, not 51


def test_error_after_items_is_raised_after_they_are_delivered():
    async def run() -> tuple[list[list[int]], BaseException | None]:
        queue: asyncio.Queue = asyncio.Queue()
        for item in (1, 2, ValueError("bad")):
            queue.put_nowait(item)
        got: list[list[int]] = []
        try:
            async for items in batched(_source(queue)):
                got.append(items)
        except ValueError as err:
            return got, err
        return got, None

    got, err = asyncio.run(run())
    assert [x for items in got for x in items] == [1, 2] and isinstance(err, ValueError)


def test_closing_cancels_the_source_and_runs_its_cleanup():
    cleaned = []

    async def endless():
        try:
            while True:
                await asyncio.sleep(0.001)
                yield 1
        finally:
            cleaned.append(True)

    async def run() -> None:
        gen = batched(endless())
        await gen.__anext__()
        await gen.aclose()

    asyncio.run(run())
    assert cleaned == [True]


def _lp(token_id: int) -> PositionLogprob:
    t = TokenLogprob(token_id, -0.5, 1, f"t{token_id}")
    return PositionLogprob(t, (t,))


def test_merge_chunks_keeps_text_tokens_logprobs_and_final_fields():
    prompt_lp = (None, _lp(9))
    chunks = [
        GenerateChunk("r", "rep", (CompletionDelta(0, "a", 1, logprobs=(_lp(1),)), CompletionDelta(1, "x", 1)),
                      num_prompt_tokens=2, prompt_logprobs=prompt_lp),
        GenerateChunk("r", "rep", (CompletionDelta(0, "b", 1, logprobs=(_lp(2),)), CompletionDelta(1, "y", 1, "stop")),
                      num_prompt_tokens=2),
        GenerateChunk("r", "rep", (CompletionDelta(0, "c", 2, "length", logprobs=(_lp(3), _lp(4))),),
                      finished=True, num_prompt_tokens=2, num_cached_prompt_tokens=1, cost_usd=0.25),
    ]
    merged = merge_chunks(chunks)
    by_index = {d.index: d for d in merged.deltas}
    assert (by_index[0].text, by_index[0].num_tokens, by_index[0].finish_reason) == ("abc", 4, "length")
    assert [p.token.token_id for p in by_index[0].logprobs] == [1, 2, 3, 4]
    assert (by_index[1].text, by_index[1].num_tokens, by_index[1].finish_reason, by_index[1].logprobs) == (
        "xy", 2, "stop", None)
    assert merged.finished and merged.num_cached_prompt_tokens == 1 and merged.prompt_logprobs == prompt_lp
    assert merged.cost_usd == 0.25  # the request's cost rides on the final chunk
    assert merge_chunks(chunks[:1]) is chunks[0]


def test_merge_chunks_keeps_an_error():
    err = ErrorInfo(ErrorKind.INTERNAL, "boom")
    merged = merge_chunks([GenerateChunk("r", "rep", (CompletionDelta(0, "a", 1),)),
                           GenerateChunk("r", "rep", finished=True, error=err)])
    assert merged.error == err and merged.finished and merged.deltas[0].text == "a"


@pytest.mark.parametrize("num_steps", [1, 7])
def test_merge_of_single_token_chunks_equals_their_concatenation(num_steps):
    chunks = [GenerateChunk("r", "rep", (CompletionDelta(0, f" w{i}", 1),), finished=i == num_steps - 1)
              for i in range(num_steps)]
    merged = merge_chunks(chunks)
    assert merged.deltas[0].text == "".join(f" w{i}" for i in range(num_steps))
    assert merged.deltas[0].num_tokens == num_steps and merged.finished


def test_min_interval_holds_messages_back_but_never_the_first_or_the_end():
    async def run() -> tuple[list[list[int]], list[float]]:
        queue: asyncio.Queue = asyncio.Queue()
        sent: list[list[int]] = []
        times: list[float] = []
        loop = asyncio.get_running_loop()

        async def consume() -> None:
            async for items in batched(_source(queue), min_interval_s=0.2):
                sent.append(items)
                times.append(loop.time())

        task = asyncio.create_task(consume())
        start = loop.time()
        for i in range(10):  # one item every 10 ms for 100 ms: inside one interval
            queue.put_nowait(i)
            await asyncio.sleep(0.01)
        queue.put_nowait(None)  # the end flushes at once, without waiting for the interval
        await asyncio.wait_for(task, 5)
        return sent, [t - start for t in times]

    sent, times = asyncio.run(run())
    assert sent[0] == [0] and times[0] < 0.05  # the first item is not held
    assert [x for items in sent for x in items] == list(range(10))
    assert len(sent) == 2  # everything after the first went out as one message, at the end
    assert times[-1] < 0.19  # the end did not wait for the 200 ms interval


def test_min_interval_spaces_messages_of_a_long_stream():
    async def run() -> list[float]:
        async def source():
            for i in range(40):  # 400 ms of items every 10 ms
                yield i
                await asyncio.sleep(0.01)

        loop = asyncio.get_running_loop()
        times = []
        async for _ in batched(source(), min_interval_s=0.1):
            times.append(loop.time())
        return times

    times = asyncio.run(run())
    assert 4 <= len(times) <= 7  # ~400 ms / 100 ms, not 40
    gaps = [b - a for a, b in zip(times[:-1], times[1:], strict=True)]
    assert min(gaps[:-1], default=0.1) >= 0.095  # interval respected (the final flush may come sooner)

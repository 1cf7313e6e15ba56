"""Runs a load point against one endpoint: sends the requests on schedule and collects the records.

Data flow: `run_point` opens the endpoint's client (clients.py), then either
  - rate: starts one task per request, each sleeping until its send time from arrivals.py (an
    open loop: a slow server does not slow the arrivals down), or
  - concurrency: starts that many workers that take the next request as soon as their last one
    ended (a closed loop);
and waits for every record. `run_all` walks the load points in order and, within each, the
endpoints one after the other (never at once, so side-by-side servers on one machine do not
compete), always sending requests of the same lengths, with fresh prompt content each time (no
prefix-cache hit from an earlier point); `num_warmup` requests go to each endpoint first, unmeasured.
A point's duration runs from its start to its last request's end: the denominator of its throughput.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from shardserve.cluster.bench_serve.arrivals import LoadPoint, Schedule, send_offsets
from shardserve.cluster.bench_serve.clients import Client, open_client
from shardserve.cluster.bench_serve.dataset import ServeRequest
from shardserve.cluster.bench_serve.records import PointResult, RequestRecord
from shardserve.cluster.bench_serve.settings import ClientSettings, Endpoint


async def _timed(client: Client, index: int, request: ServeRequest, t0: float) -> RequestRecord:
    send_s = time.perf_counter() - t0
    record = await client.send(index, request)
    record.send_s = send_s
    return record


async def _by_rate(client: Client, requests: list[ServeRequest], rate: float, schedule: Schedule,
                   t0: float) -> list[RequestRecord]:
    offsets = send_offsets(len(requests), rate, schedule.arrival, schedule.burstiness, schedule.seed)

    async def at(offset: float, index: int) -> RequestRecord:
        await asyncio.sleep(max(0.0, t0 + offset - time.perf_counter()))
        return await _timed(client, index, requests[index], t0)

    return list(await asyncio.gather(*(at(off, i) for i, off in enumerate(offsets))))


async def _by_concurrency(client: Client, requests: list[ServeRequest], concurrency: int,
                          t0: float) -> list[RequestRecord]:
    queue = list(enumerate(requests))[::-1]
    records: list[RequestRecord] = []

    async def worker() -> None:
        while queue:
            index, request = queue.pop()
            records.append(await _timed(client, index, request, t0))

    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(requests)))))
    return sorted(records, key=lambda r: r.index)


async def run_point(endpoint: Endpoint, point: LoadPoint, requests: list[ServeRequest], settings: ClientSettings,
                    schedule: Schedule) -> PointResult:
    async with open_client(endpoint, settings) as client:
        t0 = time.perf_counter()
        if point.kind == "rate":
            records = await _by_rate(client, requests, point.value, schedule, t0)
        else:
            records = await _by_concurrency(client, requests, int(point.value), t0)
        duration = time.perf_counter() - t0
    return PointResult(endpoint.label, point, duration, records)


async def run_all(endpoints: list[Endpoint], points: list[LoadPoint], requests_for: Callable[[int], list[ServeRequest]],
                  settings: ClientSettings, schedule: Schedule,
                  on_result: Callable[[PointResult], None] | None = None, num_warmup: int = 0) -> list[PointResult]:
    """`requests_for(salt)`: the run's requests with prompt content of that salt (dataset.fresh_prompts):
    salt 0 for the warm-up, then one per load point and endpoint."""
    if num_warmup > 0:  # first requests pay connection set-up, and a server's own warm-up; not measured
        warmup = LoadPoint("concurrency", num_warmup)
        for endpoint in endpoints:
            await run_point(endpoint, warmup, requests_for(0)[:num_warmup], settings, schedule)
    results = []
    for i, point in enumerate(points):
        for j, endpoint in enumerate(endpoints):
            requests = requests_for(1 + i * len(endpoints) + j)
            result = await run_point(endpoint, point, requests, settings, schedule)
            if on_result is not None:
                on_result(result)
            results.append(result)
    return results

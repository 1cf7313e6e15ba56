"""LLMServer deployment: one replica owns one engine and streams its outputs to the ingress.

Data flow: the Ingress calls `generate(GenerateRequest)` through a DeploymentHandle (the
prefix-affinity router in cluster/router.py picks the replica) or, with the model's `direct_stream`,
on this replica's own port (cluster/direct_stream.py; published by `record_replica_metadata`).
The replica renders chat messages with the engine's template, hands prompt + SamplingParams to
`engine.generate`, and turns each `RequestOutput` into a compact `GenerateChunk` (text delta, token
count, finish reason, this replica's id). Bad input, a full queue and a dead engine come back as one
chunk with an `ErrorInfo`, never as an exception. If the caller goes away, its call cancels this
generator; the `finally` aborts the request, so its KV blocks return to the pool.
One replica = one worker group: with tp × pp = 1 the replica runs the model itself; otherwise its
engine uses the Ray launcher and drives one Ray actor per rank in the placement group cluster/app.py
reserved (workers/group.py; per-step messages go over sockets, never Ray calls). Serve's
`check_health` reaches the executor's, so a dead rank makes the replica unhealthy and Serve
replaces it; requests in flight end with UNAVAILABLE (HTTP 503). `__del__` stops the engine.
Engine: `AsyncEngine.from_config(engine_config(section))`, built on a thread so the replica's
event loop stays free while ranks start and weights load; or an `engine_factory` from Python
(`build_app(config, engine_factory=...)`: the tests' fake engines). Metrics: cluster/metrics/
(each finished request and engine step; the Ingress's /metrics pulls `metrics_snapshot()`).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

from shardserve.cluster.config import ModelSection
from shardserve.cluster.direct_stream import METADATA_KEY as DIRECT_ADDRESS_KEY
from shardserve.cluster.direct_stream import DirectServer
from shardserve.cluster.messages import (
    ChunkBuilder,
    ErrorInfo,
    ErrorKind,
    GenerateChunk,
    GenerateRequest,
)
from shardserve.cluster.metrics.replica import ReplicaMetrics
from shardserve.cluster.metrics.startup import StartupClock
from shardserve.cluster.streaming import batched, merge_chunks
from shardserve.workers.config import EngineConfig
from shardserve.workers.protocol import EngineDeadError, EngineProtocol, QueueFullError

# Builds the engine of a model section instead of the real AsyncEngine (tests: tests/doubles/).
EngineFactory = Callable[[ModelSection], "EngineProtocol | Awaitable[EngineProtocol]"]
# Finished requests whose timings `recent_requests()` keeps (benchmarks read them by request id).
NUM_RECENT_REQUESTS = 8192
# How long a stopping replica lets direct-stream calls in flight finish (Serve's default graceful
# shutdown timeout, which bounds its drain of the handle calls).
DIRECT_DRAIN_S = 20.0
METRICS_FLUSH_PERIOD_S = 5.0  # steps into histograms and gauges sampled, for Ray's export
_PARAM = re.compile(r"^([A-Za-z_][A-Za-z0-9_.\[\]]*) (must|is|are|should)\b")


def param_of(message: str) -> str | None:
    """The field a validation message names (`max_tokens must be >= 1, got 0` → max_tokens)."""
    match = _PARAM.match(message)
    return match.group(1) if match else None


def process_rss_bytes() -> int:
    """Resident memory of this replica's process (Linux /proc), 0 where unknown: soaks watch it stay flat."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def engine_config(section: ModelSection) -> EngineConfig:
    """The section's EngineConfig; a world of several ranks runs on a Ray worker group."""
    config = section.to_engine_config()
    if config.parallel.world_size > 1:
        config = replace(config, parallel=replace(config.parallel, launcher="ray"))
    return config


async def make_engine(section: ModelSection, engine_factory: EngineFactory | None = None) -> EngineProtocol:
    if engine_factory is not None:
        engine = engine_factory(section)
    else:
        from shardserve.workers.async_engine import AsyncEngine

        engine = await asyncio.to_thread(AsyncEngine.from_config, engine_config(section))
    if inspect.isawaitable(engine):
        engine = await engine
    return engine


@dataclass
class _Trace:
    """Wall-clock stamps (time.time()) of one request's first token on its way through the serving
    path, kept with its timing in `recent_requests()` (benchmarks/serve_latency.py reads them): the
    Ingress built the request, the router picked this replica, it received it, the first chunk was
    yielded. The engine's own stamps (add_request, first token: RequestMetrics, monotonic) are moved
    onto the same clock."""

    ingress_unix_s: float
    router_pick_unix_s: float | None
    server_receive_unix_s: float
    first_yield_unix_s: float | None = None

    def unix_stamps(self, metrics: Any) -> dict[str, float | None]:
        shift = time.time() - time.monotonic()
        first_token = None if metrics is None else metrics.first_token_time
        return {
            "ingress_unix_s": self.ingress_unix_s,
            "router_pick_unix_s": self.router_pick_unix_s,
            "server_receive_unix_s": self.server_receive_unix_s,
            "engine_arrival_unix_s": None if metrics is None else metrics.arrival_time + shift,
            "engine_first_token_unix_s": None if first_token is None else first_token + shift,
            "server_first_yield_unix_s": self.first_yield_unix_s,
        }


class LLMServer:
    """Ray Serve deployment class (wrapped with serve.deployment in cluster/app.py)."""

    async def __init__(self, model: dict[str, Any], engine_factory: EngineFactory | None = None) -> None:
        from ray import serve

        clock = StartupClock()
        self.section = ModelSection.model_validate(model)
        self.stream_interval_ms = self.section.effective_stream_interval_ms()
        self.priced = self.section.cost.to_engine().priced  # final chunks carry cost_usd (workers/cost.py)
        self.engine = await make_engine(self.section, engine_factory)
        clock.stage("engine")
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.num_in_flight = 0
        self._recent: OrderedDict[str, dict[str, float | None]] = OrderedDict()
        self.metrics = ReplicaMetrics(self.section.name, self.replica_id)
        if hasattr(self.engine, "step_observer"):  # AsyncEngine: called on its thread after each step
            self.engine.step_observer = self.metrics.observe_step
        self._flusher = asyncio.get_running_loop().create_task(self._flush_metrics_forever())
        self.direct: DirectServer | None = None
        if self.section.direct_stream:  # the Ingress's direct stream (cluster/direct_stream.py)
            self.direct = DirectServer(self.generate)
            await self.direct.start()
        clock.log_ready(self.section.name, self.replica_id)
        self.metrics.set_startup(clock.stages)

    def _error(self, request_id: str, kind: ErrorKind, message: str, param: str | None = None) -> GenerateChunk:
        return GenerateChunk(
            request_id=request_id, replica_id=self.replica_id, finished=True, error=ErrorInfo(kind, message, param)
        )

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        received = time.time()
        rid = request.request_id
        if request.model != self.section.name:
            yield self._error(rid, ErrorKind.NOT_FOUND, f"model {request.model!r} is not served here", "model")
            return
        try:
            prompt: Any = request.prompt
            if request.messages is not None:
                messages = [{"role": role, "content": content} for role, content in request.messages]
                prompt = self.engine.apply_chat_template(messages)
        except ValueError as err:
            yield self._error(rid, ErrorKind.INVALID_ARGUMENT, str(err), param_of(str(err)) or "messages")
            return
        self.num_in_flight += 1
        start = time.monotonic()
        trace = _Trace(request.arrival_unix_s, request.stamps.get("routed"), received)
        stream = self.engine.generate(prompt, request.params, rid, request.priority)
        builder = ChunkBuilder(rid, self.replica_id, priced=self.priced)
        finished = False
        try:
            if self.stream_interval_ms > 0:
                # At most one message per interval: what piled up meanwhile goes together
                # (cluster/streaming.py). Closed before the `finally` below, so `stream` is no
                # longer being read when it closes.
                interval = self.stream_interval_ms / 1000
                async with contextlib.aclosing(batched(stream, interval)) as batches:
                    async for outs in batches:
                        chunk = merge_chunks([builder.build(out) for out in outs])
                        trace.first_yield_unix_s = trace.first_yield_unix_s or time.time()
                        finished = outs[-1].finished
                        if finished:
                            self._record(request, outs[-1], start, trace)
                        yield chunk
            else:
                # One message per engine step, read directly. (Merging here by default, through a
                # reader task per stream, coincided with Ray's gRPC proxy segfaulting while
                # cancelling streams in CI; see cluster/app.py.)
                async for out in stream:
                    chunk = builder.build(out)
                    trace.first_yield_unix_s = trace.first_yield_unix_s or time.time()
                    finished = out.finished
                    if finished:
                        self._record(request, out, start, trace)
                    yield chunk
        except ValueError as err:
            yield self._error(rid, ErrorKind.INVALID_ARGUMENT, str(err), param_of(str(err)))
        except QueueFullError as err:
            yield self._error(rid, ErrorKind.QUEUE_FULL, str(err))
        except EngineDeadError as err:
            yield self._error(rid, ErrorKind.UNAVAILABLE, f"engine is dead: {err}")
        finally:
            self.num_in_flight -= 1
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
            if not finished:
                await self.engine.abort(rid)

    def _record(self, request: GenerateRequest, out: Any, start: float, trace: _Trace) -> None:
        """Count a finished request in the metrics; keep the engine's own timing of it (what the serving
        path adds is the rest) and the per-hop trace of its first token (`_Trace`)."""
        self.metrics.on_finished(out, request.tenant, request.user, request.arrival_unix_s)
        request_id = request.request_id
        metrics = out.metrics
        entry: dict[str, float | None] = {"server_e2e_s": time.monotonic() - start, "engine_e2e_s": None,
                                          "engine_ttft_s": None, **trace.unix_stamps(metrics)}
        if metrics is not None:
            end = metrics.finished_time or metrics.last_token_time
            entry["engine_e2e_s"] = None if end is None else end - metrics.arrival_time
            entry["engine_ttft_s"] = metrics.ttft
        self._recent[request_id] = entry
        while len(self._recent) > NUM_RECENT_REQUESTS:
            self._recent.popitem(last=False)

    async def recent_requests(self, replica_id: str | None = None) -> dict[str, Any]:
        """Timings of the last NUM_RECENT_REQUESTS finished requests, by request id: engine-side
        end-to-end and TTFT (the engine's RequestMetrics) and the replica's own end-to-end.

        `replica_id` pins the call to that replica (cluster/router.py); the answer names the
        replica that answered, so a caller can tell if the pin missed (the replica is gone)."""
        return {"replica_id": self.replica_id, "requests": dict(self._recent)}

    async def stats(self) -> dict[str, Any]:
        stats = asdict(await self.engine.stats())
        return {"replica_id": self.replica_id, "model": self.section.name, "num_in_flight": self.num_in_flight, **stats}

    async def metrics_snapshot(self, replica_id: str | None = None) -> dict[str, Any]:
        """This replica's metric families for the Ingress's /metrics (cluster/metrics/scrape.py);
        `replica_id` pins the call to that replica (cluster/router.py)."""
        await self._flush_metrics()
        return {"replica_id": self.replica_id, "families": self.metrics.snapshot()}

    async def _flush_metrics(self) -> None:
        try:
            stats = await self.engine.stats()
        except EngineDeadError:
            stats = None
        self.metrics.flush(stats)

    async def _flush_metrics_forever(self) -> None:
        while True:
            await asyncio.sleep(METRICS_FLUSH_PERIOD_S)
            with contextlib.suppress(Exception):  # a dead engine: health checks report it
                await self._flush_metrics()

    async def record_routing_stats(self) -> dict[str, Any]:
        """Ray Serve polls this; the router shows it per replica on the stats endpoint."""
        stats = await self.engine.stats()
        return {
            "num_running": stats.num_running,
            "num_waiting": stats.num_waiting,
            "kv_cache_usage": stats.kv_cache_usage,
            "prefix_cache_hit_rate": stats.prefix_cache_hit_rate,
            "process_rss_bytes": process_rss_bytes(),
            "cpu_activations": stats.cpu_activations,  # ModelConfig.cpu_activations as resolved (float | int8)
            "cost": None if stats.cost is None else asdict(stats.cost),  # /v1/stats (cluster/ingress/cost_view.py)
            # speculative decoding's totals (drafts, draft / accepted tokens, per position), null when off
            "spec_decode": None if stats.spec_decode is None else asdict(stats.spec_decode),
        }

    async def check_health(self) -> None:
        """Serve's health hook: raises when the engine or a rank of its worker group is dead."""
        await self.engine.health()

    def record_replica_metadata(self) -> dict[str, Any]:
        """Serve's hook, read once when the replica is ready: routers see the direct-stream address."""
        return {} if self.direct is None else {DIRECT_ADDRESS_KEY: self.direct.address}

    async def __del__(self) -> None:
        """Serve's graceful shutdown (after it drained the handle calls): the direct-stream port refuses
        new calls (the Ingress sends them through the handle) and lets running ones finish, for up to
        DIRECT_DRAIN_S; then stop the engine thread and the worker group's ranks."""
        direct = getattr(self, "direct", None)
        if direct is not None:
            await direct.stop(DIRECT_DRAIN_S)
        flusher = getattr(self, "_flusher", None)
        if flusher is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the task is gone with it
                flusher.get_loop().call_soon_threadsafe(flusher.cancel)
        shutdown = getattr(getattr(self, "engine", None), "shutdown", None)
        if shutdown is not None:
            shutdown()

    async def health(self) -> dict[str, str]:
        try:
            await self.engine.health()
        except EngineDeadError as err:
            return {"replica_id": self.replica_id, "status": f"dead: {err}"}
        return {"replica_id": self.replica_id, "status": "ok"}

    def debug_state(self) -> dict[str, Any]:
        """Test hook: the engine's own debug view (FakeEngine: blocks held, aborted ids), else {}."""
        debug = getattr(self.engine, "debug_state", None)
        return {"replica_id": self.replica_id, **(debug() if debug is not None else {})}

    def kill_engine(self) -> None:
        """Test hook: make a FakeEngine fail as a dead engine would (no-op for other engines)."""
        kill = getattr(self.engine, "kill", None)
        if kill is not None:
            kill()

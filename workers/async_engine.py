"""AsyncEngine: the LLMEngine's step loop on a dedicated thread, streamed to asyncio callers.

Only the engine thread touches the LLMEngine. Callers talk to it through a command queue:
`generate()` submits an "add" command and awaits its future, so validation errors
(ValueError naming the field, QueueFullError) surface before anything is yielded; the engine
thread then pushes every RequestOutput of that request into the caller's asyncio.Queue with
`loop.call_soon_threadsafe`. When the caller stops early (client gone, task cancelled, a
timeout) at any point — even while its "add" is still queued — the generator's `finally`
submits an abort of *its own* stream (commands run in order, so it lands after the add), and
the KV blocks are freed at once. Nothing a caller does can raise on the engine thread: a
command whose future was cancelled before it ran is skipped (`set_running_or_notify_cancel`),
and a running future cannot be cancelled. If a step raises, the engine is dead: every open
stream gets EngineDeadError and health() raises, so the serving layer can report unhealthy and
be replaced. health() also asks the executor whether every rank of its worker group is alive
(`Executor.check_health`, on the engine thread between steps); it never waits behind a step for
long: while a step runs it reports healthy unless that step has outlasted `step_timeout_s`
(a hung rank), so Serve's health check answers in time. Implements EngineProtocol.
`step_observer`, when set (the serving layer's metrics), is called on the engine thread after each
step with its wall time and the number of requests that produced output; it must only record
(an append), never block.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from shardserve.workers.config import EngineConfig
from shardserve.workers.engine import LLMEngine
from shardserve.workers.protocol import EngineDeadError, EngineStats, ModelInfo
from shardserve.workers.request import RequestOutput, SamplingParams
from shardserve.workers.worker.executor import WorkerGroupError

logger = logging.getLogger(__name__)
# How long health() waits for its check to run between steps before judging the running step.
HEALTH_WAIT_S = 1.0


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue  # RequestOutput items, or an Exception that ends the stream


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.Queue[tuple[Callable[[], Any], concurrent.futures.Future]] = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._dead: BaseException | None = None
        self._stopped = False
        self._step_started: float | None = None  # monotonic time the running step began, else None
        self.step_observer: Callable[[float, int], None] | None = None
        self._thread = threading.Thread(target=self._run, name="shardserve-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig, progress: bool = False) -> AsyncEngine:
        return cls(LLMEngine(config, progress=progress))

    # ---- EngineProtocol ------------------------------------------------------------------

    async def generate(
        self, prompt: str | Sequence[int], params: SamplingParams, request_id: str, priority: int = 0
    ) -> AsyncIterator[RequestOutput]:
        self._raise_if_dead()
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        finished = False
        try:
            # A cancel here may come before or after the engine thread ran the add: the abort in
            # `finally` covers both (it only touches this stream's request).
            await self._call(lambda: self._add(request_id, prompt, params, priority, stream))
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished and not self._dead:
                self._submit(lambda: self._abort_stream(request_id, stream))

    async def abort(self, request_id: str) -> None:
        if not self._dead:
            await self._call(lambda: self._abort(request_id))

    async def health(self) -> None:
        """Raise EngineDeadError if the engine failed or a rank of its worker group is gone.

        The executor's check runs on the engine thread (between steps), which owns the executor.
        """
        self._raise_if_dead()
        if not self._thread.is_alive():
            raise EngineDeadError("engine thread is not running")
        try:
            await asyncio.wait_for(self._call(self.engine.executor.check_health), HEALTH_WAIT_S)
        except WorkerGroupError as err:
            raise EngineDeadError(f"worker group failed: {err}") from err
        except asyncio.TimeoutError:  # a step is running: it fails by itself if a rank dies
            started = self._step_started
            limit = self.engine.config.parallel.step_timeout_s
            if started is not None and time.monotonic() - started > limit:
                raise EngineDeadError(
                    f"an engine step has run for {time.monotonic() - started:.0f}s, over "
                    f"parallel.step_timeout_s = {limit:g}: a rank is hung"
                ) from None
            self._raise_if_dead()

    async def stats(self) -> EngineStats:
        self._raise_if_dead()
        return await self._call(self.engine.stats)

    def model_info(self) -> ModelInfo:
        return self.engine.model_info()

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        tokenizer = self.engine.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("messages: this model has no chat template; use the completions API")
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def shutdown(self) -> None:
        self._stopped = True
        self._submit(lambda: None)  # wake the loop
        self._thread.join(timeout=10)
        self.engine.shutdown()

    # ---- caller side ---------------------------------------------------------------------

    def _submit(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((fn, future))
        return future

    async def _call(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.wrap_future(self._submit(fn))

    def _raise_if_dead(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"engine failed: {self._dead!r}")

    # ---- engine thread -------------------------------------------------------------------

    def _add(self, request_id: str, prompt: str | Sequence[int], params: SamplingParams, priority: int,
             stream: _Stream) -> None:
        self.engine.add_request(request_id, prompt, params, priority=priority, check_queue=True)
        self._streams[request_id] = stream

    def _abort(self, request_id: str) -> None:
        # The stream stays until the abort's own final output (finish_reason abort) reaches it.
        self.engine.abort_request(request_id)

    def _abort_stream(self, request_id: str, stream: _Stream) -> None:
        """Abort `request_id` if `stream` still owns it (not if its add failed, e.g. a duplicate id)."""
        if self._streams.get(request_id) is stream:
            self._abort(request_id)

    def _run(self) -> None:
        try:
            while not self._stopped:
                block = not self.engine.has_unfinished_requests()
                self._run_commands(block)
                if self.engine.has_unfinished_requests():
                    started = self._step_started = time.monotonic()
                    outputs = self.engine.step()
                    self._step_started = None
                    observer = self.step_observer
                    if observer is not None:
                        observer(time.monotonic() - started, len(outputs))
                    self._dispatch(outputs)
        except BaseException as exc:  # the engine is unusable now; fail every stream
            logger.exception("engine step failed")
            self._dead = exc
            error = EngineDeadError(f"engine failed: {exc!r}")
            for stream in self._streams.values():
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, error)
            self._streams.clear()
            while not self._commands.empty():
                _, future = self._commands.get_nowait()
                if future.set_running_or_notify_cancel():
                    future.set_exception(error)

    def _run_commands(self, block: bool) -> None:
        try:
            fn, future = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            # False: the caller cancelled before the command ran, so it is skipped. Once running,
            # the future cannot be cancelled, so setting its outcome below never raises.
            if future.set_running_or_notify_cancel():
                try:
                    result = fn()
                except Exception as exc:  # a bad request fails its caller, never the engine
                    future.set_exception(exc)
                else:
                    future.set_result(result)
            try:
                fn, future = self._commands.get_nowait()
            except queue.Empty:
                return

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            by_loop.setdefault(stream.loop, []).append((stream.queue, out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the caller's event loop is closed: nobody is listening
                for _, out in items:
                    self._submit(lambda rid=out.request_id: self._abort(rid))


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for q, out in items:
        q.put_nowait(out)

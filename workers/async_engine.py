"""AsyncEngine: the LLMEngine's step loop on a dedicated thread, streamed to asyncio callers.

Only the engine thread touches the LLMEngine. Callers talk to it through a command queue:
`generate()` submits an "add" command and awaits its future, so validation errors
(ValueError naming the field, QueueFullError) surface before anything is yielded; the engine
thread then pushes every RequestOutput of that request into the caller's asyncio.Queue with
`loop.call_soon_threadsafe`. When the caller stops iterating early (client gone, task
cancelled), the generator's `finally` submits an abort, so KV blocks are freed at once.
If a step raises, the engine is dead: every open stream gets EngineDeadError and health()
raises, so the serving layer can report unhealthy and be replaced. health() also asks the
executor whether every rank of its worker group is alive (`Executor.check_health`).
Implements workers/protocol.py's EngineProtocol.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from shardserve.workers.config import EngineConfig
from shardserve.workers.engine import LLMEngine
from shardserve.workers.protocol import EngineDeadError, EngineStats, ModelInfo, QueueFullError
from shardserve.workers.request import RequestOutput, SamplingParams
from shardserve.workers.worker.executor import WorkerGroupError

logger = logging.getLogger(__name__)


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
        try:
            await self._call(lambda: self._add(request_id, prompt, params, priority, stream))
        except asyncio.CancelledError:
            # Cancelled while the add was queued: it still runs on the engine thread, so abort it
            # (queued after it), or the request would run on unread, holding its KV blocks.
            if not self._dead:
                self._submit(lambda: self._abort(request_id))
            raise
        finished = False
        try:
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
                self._submit(lambda: self._abort(request_id))

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
            await self._call(self.engine.executor.check_health)
        except WorkerGroupError as err:
            raise EngineDeadError(f"worker group failed: {err}") from err

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
        if self.engine.num_waiting() >= self.engine.config.scheduler.max_queue_len:
            raise QueueFullError(
                f"queue full: {self.engine.config.scheduler.max_queue_len} requests waiting "
                "(scheduler.max_queue_len); retry later"
            )
        self.engine.add_request(request_id, prompt, params, priority=priority)
        self._streams[request_id] = stream

    def _abort(self, request_id: str) -> None:
        self.engine.abort_request(request_id)

    def _run(self) -> None:
        try:
            while not self._stopped:
                block = not self.engine.has_unfinished_requests()
                self._run_commands(block)
                if self.engine.has_unfinished_requests():
                    self._dispatch(self.engine.step())
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
            # A caller cancelled while waiting (client gone) leaves a cancelled future: the command
            # still runs (an add is then aborted by its caller, an abort must happen anyway), but
            # setting a result on it would raise InvalidStateError and kill the engine thread.
            wanted = future.set_running_or_notify_cancel()
            try:
                result = fn()
            except Exception as exc:  # a bad request fails its caller, never the engine
                if wanted:
                    future.set_exception(exc)
            else:
                if wanted:
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

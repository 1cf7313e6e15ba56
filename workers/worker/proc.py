"""The process side of the multi-process executor: a Worker fed through one pipe.

Messages are pickled tuples sent as raw bytes (`Connection.send_bytes`): the driver pickles a
step once and writes the same bytes to every rank's pipe; there is no RPC layer per step.
Driver -> worker:  (STEP, SchedulerOutput) | (CALL, (method name, args)) | (SHUTDOWN, None)
Worker -> driver:  (READY, RankReady) once after start-up; (OUTPUT, ModelRunnerOutput) after
                   each step, from the output rank only; (RESULT, value) after each CALL, from
                   every rank, or (CALL_FAILED, traceback) from a rank whose CALL raised (it
                   keeps serving); (ERROR, traceback) before exiting with code 1.
A closed pipe (the driver died) ends the loop; so does an error in a collective (a peer died).
When the engine keeps several steps in flight (async scheduling, pipeline stages) a rank runs
`_serve_overlapped`: it launches step N+1 (input preparation, graph replay, queued behind N on
the device) before it finishes N (waits for N's sampled ids, writes the output), and between
messages it watches both the pipe and N's device event, so a step the driver waits for is sent
as soon as the device has it (at most POLL_S later). Pipeline stages read their pipe on a thread
(`_Inbox`) so the driver's write of step k+1 never waits for a stage busy writing step k's
output (a large message each way would deadlock the two).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from shardserve.workers.runner.step_records import PendingStep
from shardserve.workers.worker.worker import Worker, WorkerSpec

STEP, CALL, SHUTDOWN = "step", "call", "shutdown"
READY, OUTPUT, RESULT, CALL_FAILED, ERROR = "ready", "output", "result", "call-failed", "error"
CALLABLE = ("expert_load", "ping", "probe_start", "probe_stop")
POLL_S = 1e-4  # pipe poll slice while a launched step runs on the device (overlapped loop)


def encode(kind: str, payload: Any) -> bytes:
    return pickle.dumps((kind, payload), protocol=pickle.HIGHEST_PROTOCOL)


def decode(data: bytes) -> tuple[str, Any]:
    return pickle.loads(data)


def worker_main(spec: WorkerSpec, conn: Connection) -> None:
    """Entry point of a spawned rank: build the Worker, report READY, serve until told to stop."""
    logging.basicConfig(level=logging.INFO, format=f"[rank {spec.rank}] %(levelname)s %(name)s: %(message)s")
    try:
        worker = Worker(spec)
        conn.send_bytes(encode(READY, worker.ready))
        _serve(worker, conn)
    except BaseException as exc:
        message = f"rank {spec.rank}: {_timeout_hint(spec, exc)}{traceback.format_exc()}"
        with contextlib.suppress(OSError, EOFError):
            conn.send_bytes(encode(ERROR, message))
        print(message, file=sys.stderr, flush=True)
        os._exit(1)  # no clean-up: a collective clean-up could wait on the peer that failed
    worker.shutdown()


def _timeout_hint(spec: WorkerSpec, exc: BaseException) -> str:
    """A first line naming the setting when a collective timed out (gloo: `Timed out waiting
    3000ms for recv operation`; torch's DistBackendError is a RuntimeError too)."""
    if isinstance(exc, RuntimeError) and "timed out" in str(exc).lower():
        seconds = spec.config.parallel.collective_timeout_s
        return (f"a collective timed out after parallel.collective_timeout_s = {seconds:g} s "
                "(a peer rank is stalled, hung or gone)\n")
    return ""


class _Inbox:
    """Reads and decodes the driver's messages on a daemon thread into a FIFO queue."""

    _CLOSED = ("closed", None)  # the driver is gone (EOF)

    def __init__(self, conn: Connection) -> None:
        self._queue: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._next: tuple[str, Any] | None = None  # taken off the queue by poll(), not yet by get()
        threading.Thread(target=self._read, args=(conn,), name="shardserve-inbox", daemon=True).start()

    def _read(self, conn: Connection) -> None:
        while True:
            try:
                message = decode(conn.recv_bytes())
            except (EOFError, OSError):
                self._queue.put(self._CLOSED)
                return
            except BaseException:  # undecodable: the main loop raises it (and reports ERROR)
                self._queue.put(("inbox-error", traceback.format_exc()))
                return
            self._queue.put(message)
            if message[0] == SHUTDOWN:
                return

    def poll(self, timeout: float) -> bool:
        """Whether a message is ready, waiting up to `timeout` seconds for one."""
        if self._next is None:
            try:
                self._next = self._queue.get(timeout=timeout)
            except queue.Empty:
                return False
        return True

    def get(self) -> tuple[str, Any]:
        """The next message; raises EOFError once the driver is gone."""
        if self._next is not None:
            message, self._next = self._next, None
        else:
            message = self._queue.get()
        kind, payload = message
        if kind == "closed":
            raise EOFError
        if kind == "inbox-error":
            raise RuntimeError(f"could not read a driver message:\n{payload}")
        return kind, payload


class _Pipe:
    """The driver's messages read straight from the pipe (no pipeline stages)."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def poll(self, timeout: float) -> bool:
        return self._conn.poll(timeout)

    def get(self) -> tuple[str, Any]:
        return decode(self._conn.recv_bytes())


def _serve(worker: Worker, conn: Connection) -> None:
    inbox: _Inbox | _Pipe = _Inbox(conn) if worker.state.pp_size > 1 else _Pipe(conn)
    if worker.overlaps_steps:
        _serve_overlapped(worker, conn, inbox)
        return
    receive: Callable[[], tuple[str, Any]] = inbox.get
    while True:
        try:
            kind, payload = receive()
        except EOFError:
            return  # the driver is gone
        if kind == STEP:
            output = worker.execute(payload)
            if output is not None:
                conn.send_bytes(encode(OUTPUT, output))
        elif not _handle_control(worker, conn, kind, payload):
            return


def _handle_control(worker: Worker, conn: Connection, kind: str, payload: Any) -> bool:
    """A CALL or SHUTDOWN message; False when the loop should end.

    A CALL that raises is answered with CALL_FAILED and the loop goes on: a CALLABLE method runs
    between steps and must touch no collective (keep it so), so a failed one leaves no peer
    waiting (the driver raises WorkerCallError and the group keeps serving)."""
    if kind == CALL:
        try:
            method, args = payload
            if method not in CALLABLE:
                raise ValueError(f"worker call must be one of {CALLABLE}, got {method!r}")
            reply = encode(RESULT, getattr(worker, method)(*args))  # pickled here: an unpicklable result fails the call only
        except Exception:
            reply = encode(CALL_FAILED, traceback.format_exc())
        conn.send_bytes(reply)
        return True
    if kind == SHUTDOWN:
        return False
    raise ValueError(f"unknown message kind {kind!r}")


def _serve_overlapped(worker: Worker, conn: Connection, inbox: _Inbox | _Pipe | None = None) -> None:
    """Steps in order, each launched before the previous one is finished (see module docstring).
    Messages come from `inbox` (default: straight from `conn`); outputs go to `conn`."""
    pending: PendingStep | None = None
    inbox = inbox or _Pipe(conn)
    # When the last step was finished (its output sent): the driver answers with the next step
    # message, which must come before the device runs out of work (StepTimes.driver_s).
    finished_at: float | None = None

    def finish() -> None:
        nonlocal pending, finished_at
        assert pending is not None
        output = worker.finish(pending)
        pending = None
        if output is not None:
            conn.send_bytes(encode(OUTPUT, output))
        finished_at = time.perf_counter()

    while True:
        # Wait for the next message, or finish the launched step once the device has it.
        while pending is not None:
            if worker.step_done(pending):
                finish()
            elif inbox.poll(POLL_S):
                break
        try:
            kind, payload = inbox.get()
        except EOFError:
            return  # the driver is gone
        if finished_at is not None and kind == STEP:
            worker.note_driver_wait(time.perf_counter() - finished_at)
        finished_at = None
        if kind == STEP:
            launched = worker.launch(payload)
            if pending is not None:
                finish()
            pending = launched
            if worker.must_finish_now(pending):
                finish()
            continue
        if pending is not None:
            finish()
        if not _handle_control(worker, conn, kind, payload):
            return

"""The driver's side of the per-step protocol, shared by every multi-rank executor.

A `ConnectionGroup` holds one `multiprocessing.connection.Connection` per rank — a pipe to a
local process (MultiprocExecutor) or a socket to a Ray actor (RayExecutor, workers/group.py);
both speak proc.py's messages. `submit` pickles a step once and writes the same bytes to every
rank without waiting; `collect` reads the output rank's answer to the oldest submitted step
(ranks answer in submission order, so several steps may be in flight); `execute` is the two back
to back. `call` runs a Worker method on every rank; the output rank's outputs of steps still in
flight come first and are kept for `collect`; a method that raises fails only the call
(WorkerCallError). While it waits, the group watches the launcher's death signals
(`_death_waitables`: process sentinels) and every `liveness_poll_s` of silence asks
`check_health`; a write is bounded by step_timeout_s too (SO_SNDTIMEO), so the driver never
waits for ever. Any failure is final: every later call raises WorkerGroupError. Subclasses
start the ranks, add each connection with `_add_connection`, and implement `check_health`,
`shutdown` and `_fail_dead`. `shutdown(wait_s)` asks the ranks to stop and waits that long; a
failure kills them at once (`FAILED_WAIT_S`).
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import struct
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, NoReturn

from shardserve.workers.step_types import ModelRunnerOutput, SchedulerOutput
from shardserve.workers.worker.proc import (
    CALL,
    CALL_FAILED,
    CALLABLE,
    ERROR,
    OUTPUT,
    RESULT,
    SHUTDOWN,
    STEP,
    decode,
    encode,
)

FAILED_WAIT_S = 0.0  # how long a failed group's ranks get to exit before they are killed
STEP_TIMEOUT_NAME = "parallel.step_timeout_s"


class WorkerGroupError(RuntimeError):
    """A rank died, raised, or stopped answering; the worker group serves nothing more."""


class WorkerCallError(RuntimeError):
    """A Worker method run by `call` raised on some rank; the group is still serving."""


@dataclass(frozen=True)
class StepHandle:
    """A submitted step: its submission number, and (in-process executor) the runner's
    PendingStep — the step is launched on the device at submit and finished at collect."""

    seq: int
    output: ModelRunnerOutput | None = None
    pending: Any = None  # runner.step_records.PendingStep (Any: this module imports no runner)


class ConnectionGroup:
    liveness_poll_s: float = math.inf  # seconds of silence between check_health calls

    def __init__(self, world_size: int, output_rank: int, step_timeout_s: float) -> None:
        self.world_size = world_size
        self.output_rank = output_rank
        self.step_timeout_s = step_timeout_s
        self.num_steps = 0  # steps collected
        self._num_submitted = 0
        self.host_time_s = 0.0  # driver time spent pickling, writing and reading step messages
        self._conns: list[Connection] = []
        self._pending: list[list[tuple[str, Any]]] = [[] for _ in range(world_size)]
        self._error: str | None = None
        self._stopped = False
        self._last_decode_s = 0.0

    # ---- launcher-specific -------------------------------------------------------------

    def check_health(self) -> None:
        raise NotImplementedError

    def shutdown(self, wait_s: float = 5.0) -> None:
        """Stop every rank, after up to `wait_s` for them to exit on their own (idempotent)."""
        raise NotImplementedError

    def _fail_dead(self, rank: int) -> NoReturn:
        raise NotImplementedError

    def _add_connection(self, conn: Connection) -> None:
        """Keep `conn` as the next rank's; a write to it blocked longer than step_timeout_s fails."""
        seconds = min(self.step_timeout_s, 1e6)
        timeval = struct.pack("ll", int(seconds), int((seconds % 1) * 1e6))
        with contextlib.suppress(OSError), socket.socket(fileno=os.dup(conn.fileno())) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)  # not a socket: left unbounded
        self._conns.append(conn)

    def _death_waitables(self) -> dict[Any, int]:
        """Objects `multiprocessing.connection.wait` can watch that become ready when a rank dies."""
        return {}

    # ---- the step ----------------------------------------------------------------------

    def submit(self, sched: SchedulerOutput) -> StepHandle:
        """Send a step to every rank and return at once (the bytes are in the pipes/sockets)."""
        start = time.perf_counter()
        self._broadcast(encode(STEP, sched))
        self.host_time_s += time.perf_counter() - start
        handle = StepHandle(self._num_submitted)
        self._num_submitted += 1
        return handle

    def collect(self, handle: StepHandle) -> ModelRunnerOutput:
        """Wait for the output of `handle`, which must be the oldest step not collected yet."""
        self._raise_if_failed()  # a failed group: the engine's later batches in flight get the same error
        if handle.seq != self.num_steps:
            raise ValueError(f"steps must be collected in submission order: step {handle.seq} "
                             f"collected while step {self.num_steps} is the oldest")
        output = self._receive(self.output_rank, OUTPUT, self.step_timeout_s, STEP_TIMEOUT_NAME)
        self.host_time_s += self._last_decode_s
        self.num_steps += 1
        return output

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self.collect(self.submit(sched))

    def call(self, method: str, *args: Any) -> list[Any]:
        """Run a Worker method (see proc.CALLABLE) with `args` (pickled) on every rank; results by rank.

        Steps in flight are fine: every rank runs the method after its part of them. If the
        method raises on any rank, WorkerCallError (with that rank's traceback) is raised once
        every rank has answered, so the pipes stay in step and the group keeps serving."""
        if method not in CALLABLE:
            raise ValueError(f"worker call must be one of {CALLABLE}, got {method!r}")
        self._broadcast(encode(CALL, (method, args)))
        replies = [self._receive_reply(rank) for rank in range(self.world_size)]
        failed = [(rank, payload) for rank, (kind, payload) in enumerate(replies) if kind == CALL_FAILED]
        if failed:
            rank, trace = failed[0]
            raise WorkerCallError(f"worker call {method!r} failed on rank(s) {[r for r, _ in failed]}; "
                                  f"rank {rank}:\n{trace}")
        return [payload for _, payload in replies]

    def _receive_reply(self, rank: int) -> tuple[str, Any]:
        """`rank`'s (RESULT | CALL_FAILED, payload) to a CALL. The output rank first sends the
        outputs of the steps still in flight: they are put back, in order, for `collect`."""
        in_flight = self._num_submitted - self.num_steps if rank == self.output_rank else 0
        outputs = [self._receive(rank, OUTPUT, self.step_timeout_s, STEP_TIMEOUT_NAME) for _ in range(in_flight)]
        kind, payload = self._next_message(rank, RESULT, self.step_timeout_s, STEP_TIMEOUT_NAME)
        if kind != CALL_FAILED:
            payload = self._expect(rank, RESULT, kind, payload)
        self._pending[rank][:0] = [(OUTPUT, output) for output in outputs]
        return kind, payload

    # ---- transport ---------------------------------------------------------------------

    def _broadcast(self, data: bytes) -> None:
        self._raise_if_failed()
        try:
            for conn in self._conns:
                conn.send_bytes(data)
        except (OSError, ValueError) as exc:
            self.check_health()  # names the dead rank when the launcher already knows
            self._fail(f"could not send to a worker within {STEP_TIMEOUT_NAME} = {self.step_timeout_s:g} s "
                       f"(a rank is gone, or hung and not reading): {exc!r}")

    def _receive(self, rank: int, kind: str, timeout_s: float, timeout_name: str = "") -> Any:
        """Wait for a `kind` message from `rank`, failing fast if any rank dies or reports an error."""
        return self._expect(rank, kind, *self._next_message(rank, kind, timeout_s, timeout_name))

    def _next_message(self, rank: int, kind: str, timeout_s: float, timeout_name: str = "") -> tuple[str, Any]:
        """The next (kind, payload) from `rank` (`kind`: what the caller waits for, and
        `timeout_name`: the setting behind `timeout_s`, both for the error message)."""
        self._raise_if_failed()
        if self._pending[rank]:
            return self._pending[rank].pop(0)
        deadline = time.monotonic() + timeout_s
        deaths = self._death_waitables()
        senders = {id(conn): r for r, conn in enumerate(self._conns)}
        watched = [self._conns[rank], *(c for r, c in enumerate(self._conns) if r != rank), *deaths]
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                setting = f"; {timeout_name} = {timeout_s:g}" if timeout_name else ""
                self._fail(f"worker rank {rank} did not answer within {timeout_s:g} s (waiting for {kind!r}"
                           f"{setting}): a rank is hung or too slow; the worker group is stopped")
            ready = wait(watched, timeout=min(remaining, self.liveness_poll_s))
            if not ready:
                self.check_health()
                continue
            for item in ready:
                if not isinstance(item, Connection):
                    continue
                sender = senders[id(item)]
                try:
                    t0 = time.perf_counter()
                    got_kind, payload = decode(item.recv_bytes())
                    self._last_decode_s = time.perf_counter() - t0
                except (EOFError, OSError):
                    self._fail_dead(sender)
                if got_kind == ERROR:
                    self._fail(f"worker rank {sender} failed:\n{payload}")
                if sender == rank:
                    return got_kind, payload
                self._pending[sender].append((got_kind, payload))
            for item in ready:
                if not isinstance(item, Connection) and item in deaths:
                    self._fail_dead(deaths[item])

    def _expect(self, rank: int, kind: str, got_kind: str, payload: Any) -> Any:
        if got_kind != kind:
            self._fail(f"unexpected {got_kind!r} message from worker rank {rank} (waiting for {kind!r})")
        return payload

    def _ask_ranks_to_stop(self) -> None:
        """Best effort: a rank that is already gone cannot be told."""
        for conn in self._conns:
            with contextlib.suppress(OSError, ValueError):
                conn.send_bytes(encode(SHUTDOWN, None))

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise WorkerGroupError(self._error)

    def _fail(self, message: str) -> NoReturn:
        self._error = message
        self.shutdown(wait_s=FAILED_WAIT_S)
        raise WorkerGroupError(message)

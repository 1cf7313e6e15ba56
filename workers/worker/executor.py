"""Executors: how the engine runs one step on the model, in its own process or across ranks.

The engine calls `execute(scheduler_output) -> ModelRunnerOutput` once per step and reads
`num_blocks` (the KV blocks every rank can hold) once at start-up.
  LocalExecutor: today's single-process behaviour, a ModelRunner in the engine process.
  MultiprocExecutor: spawns world_size = TP x PP processes (multiprocessing `spawn`), one
    Worker each (worker.py), rendezvous on a free local port. A step's SchedulerOutput is
    pickled once and the same bytes are written to every rank's pipe (proc.py); the output
    rank writes back the pickled ModelRunnerOutput. While it waits, the driver watches every
    pipe and every process sentinel, so a rank that dies or raises fails the step at once with
    its exit code or traceback (the surviving ranks fail their next collective and exit, or
    are terminated by `shutdown`); a step slower than `step_timeout_s` fails too. After a
    failure every call raises `WorkerGroupError`.
`make_executor(config, loaded)` picks one from `config.parallel.world_size` and `.launcher`
(`ray`: RayExecutor in workers/group.py, the same Worker and proc.py loop in Ray actors).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import socket
import time
from multiprocessing.connection import Connection, wait
from typing import Any, Protocol

import torch
from shardserve.workers.config import EngineConfig
from shardserve.workers.models.loader import LoadedModel
from shardserve.workers.runner.model_runner import ModelRunner
from shardserve.workers.runner.output import ModelRunnerOutput
from shardserve.workers.scheduler.output import SchedulerOutput
from shardserve.workers.worker.proc import (
    CALL,
    ERROR,
    OUTPUT,
    READY,
    RESULT,
    SHUTDOWN,
    STEP,
    decode,
    encode,
    worker_main,
)
from shardserve.workers.worker.worker import WorkerSpec, output_rank


class WorkerGroupError(RuntimeError):
    """A rank died, raised, or stopped answering; the worker group serves nothing more."""


class Executor(Protocol):
    num_blocks: int

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step on every rank; the sampled tokens of the step."""
        ...

    def check_health(self) -> None:
        """Raise WorkerGroupError if any rank is gone."""
        ...

    def shutdown(self) -> None:
        """Stop every rank (idempotent)."""
        ...


class LocalExecutor:
    """The model runner in the engine's own process."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig, device: torch.device) -> None:
        self.runner = ModelRunner(loaded, config, device)
        self.num_blocks = self.runner.num_blocks

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute(sched)

    def check_health(self) -> None:
        return None

    def shutdown(self) -> None:
        return None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class MultiprocExecutor:
    """world_size local worker processes driven through one pipe each."""

    def __init__(self, config: EngineConfig, backend: str | None = None, startup_timeout_s: float = 600.0) -> None:
        self.config = config
        self.world_size = config.parallel.world_size
        self.output_rank = output_rank(config)
        self.step_timeout_s = config.parallel.step_timeout_s
        self._error: str | None = None
        self._stopped = False
        self.num_steps = 0
        self.host_time_s = 0.0  # driver time spent pickling, writing and reading step messages
        ctx = mp.get_context("spawn")
        port = free_port()
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        self._pending: list[list[tuple[str, Any]]] = [[] for _ in range(self.world_size)]
        for rank in range(self.world_size):
            parent, child = ctx.Pipe(duplex=True)
            spec = WorkerSpec(config, rank, "127.0.0.1", port, backend)
            proc = ctx.Process(target=worker_main, args=(spec, child), name=f"shardserve-rank{rank}", daemon=True)
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)
        try:
            blocks = [self._receive(rank, READY, startup_timeout_s) for rank in range(self.world_size)]
        except BaseException:
            self.shutdown()
            raise
        self.rank_num_blocks: list[int] = blocks
        self.num_blocks = min(blocks)

    # ---- the step ---------------------------------------------------------------------

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        start = time.perf_counter()
        self._broadcast(encode(STEP, sched))
        sent = time.perf_counter()
        output = self._receive(self.output_rank, OUTPUT, self.step_timeout_s)
        self.host_time_s += (sent - start) + self._last_decode_s
        self.num_steps += 1
        return output

    def call(self, method: str) -> list[Any]:
        """Run a no-argument Worker method (see proc.CALLABLE) on every rank; results by rank."""
        self._broadcast(encode(CALL, method))
        return [self._receive(rank, RESULT, self.step_timeout_s) for rank in range(self.world_size)]

    def check_health(self) -> None:
        if self._error is not None:
            raise WorkerGroupError(self._error)
        for rank, proc in enumerate(self._procs):
            if not proc.is_alive():
                self._fail(f"worker rank {rank} (pid {proc.pid}) exited with code {proc.exitcode}")

    def shutdown(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        for conn in self._conns:
            with contextlib.suppress(OSError, ValueError):
                conn.send_bytes(encode(SHUTDOWN, None))
        deadline = time.monotonic() + 5.0
        for proc in self._procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self._conns:
            conn.close()

    def __del__(self) -> None:
        if hasattr(self, "_procs"):
            self.shutdown()

    # ---- transport --------------------------------------------------------------------

    def _broadcast(self, data: bytes) -> None:
        self.check_health()
        try:
            for conn in self._conns:
                conn.send_bytes(data)
        except (OSError, ValueError) as exc:
            self._fail(f"could not send to a worker: {exc!r}")

    def _receive(self, rank: int, kind: str, timeout_s: float) -> Any:
        """Wait for a `kind` message from `rank`, failing fast if any rank dies or reports an error."""
        if self._error is not None:
            raise WorkerGroupError(self._error)
        if self._pending[rank]:
            return self._expect(rank, kind, *self._pending[rank].pop(0))
        deadline = time.monotonic() + timeout_s
        sentinels = {proc.sentinel: r for r, proc in enumerate(self._procs)}
        conns = {id(conn): r for r, conn in enumerate(self._conns)}
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._fail(f"worker rank {rank} did not answer within {timeout_s:.0f} s (waiting for {kind!r})")
            ready = wait([self._conns[rank], *(c for r, c in enumerate(self._conns) if r != rank),
                          *sentinels], timeout=remaining)
            for item in ready:
                if isinstance(item, Connection):
                    sender = conns[id(item)]
                    try:
                        t0 = time.perf_counter()
                        got_kind, payload = decode(item.recv_bytes())
                        self._last_decode_s = time.perf_counter() - t0
                    except (EOFError, OSError):
                        self._fail_dead(sender)
                    if got_kind == ERROR:
                        self._fail(f"worker rank {sender} failed:\n{payload}")
                    if sender == rank:
                        return self._expect(rank, kind, got_kind, payload)
                    self._pending[sender].append((got_kind, payload))
            for item in ready:
                if not isinstance(item, Connection) and item in sentinels:
                    self._fail_dead(sentinels[item])

    def _expect(self, rank: int, kind: str, got_kind: str, payload: Any) -> Any:
        if got_kind != kind:
            self._fail(f"unexpected {got_kind!r} message from worker rank {rank} (waiting for {kind!r})")
        return payload

    def _fail_dead(self, rank: int) -> None:
        proc = self._procs[rank]
        proc.join(timeout=1.0)
        self._fail(f"worker rank {rank} (pid {proc.pid}) died with exit code {proc.exitcode}")

    def _fail(self, message: str) -> None:
        self._error = message
        self.shutdown()
        raise WorkerGroupError(message)

    _last_decode_s = 0.0


def make_executor(config: EngineConfig, loaded: LoadedModel | None, device: torch.device) -> Executor:
    """LocalExecutor for a world of one (needs `loaded`); else by `config.parallel.launcher`:
    MultiprocExecutor (`multiproc`) or the Ray worker group of workers/group.py (`ray`)."""
    if config.parallel.world_size == 1:
        if loaded is None or loaded.model is None:
            raise ValueError("a single-process engine needs the loaded model")
        return LocalExecutor(loaded, config, device)
    if config.parallel.launcher == "ray":
        from shardserve.workers.group import RayExecutor  # imports ray: only when asked for

        return RayExecutor(config)
    return MultiprocExecutor(config)

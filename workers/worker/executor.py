"""Executors: how the engine runs one step on the model, in its own process or across ranks.

The engine's InFlightBatches (workers/inflight.py) runs a step as `submit(scheduler_output) ->
StepHandle`, then `collect(handle) -> ModelRunnerOutput`, with up to its depth of steps
submitted before the oldest is collected; outputs come back in submission order. `num_blocks`
(the KV blocks every rank can hold) and `cpu_activations` (ModelConfig.cpu_activations as the
runners resolved it: int8 if any rank's kernels use it) are read once at start-up.
  LocalExecutor: a ModelRunner in the engine process; `submit` launches the step without
    waiting for the device (ModelRunner.launch), `collect` waits for its ids (ModelRunner.finish).
  MultiprocExecutor: world_size = TP x PP spawned processes, one Worker each (worker.py), which
    rendezvous on a free local port. A step is pickled once and the same bytes go to every
    rank's pipe (proc.py); the output rank writes back the ModelRunnerOutput. While it waits
    the driver watches every pipe and process sentinel (channel.py), so a rank that dies or
    raises fails the step at once with its exit code or traceback, a step slower than
    `step_timeout_s` fails too, and after a failure every call raises `WorkerGroupError`.
Under async scheduling each rank fills the placeholder tokens of step N+1 from the ids its own
runner sampled in N (every rank of the last stage samples the same ids).
`make_executor(config, loaded, device)` (workers/launch.py) picks one from `config.parallel.world_size`
and `.launcher` (`ray`: RayExecutor in workers/group.py, the same Worker and proc.py loop in Ray actors).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import socket
import time
from typing import Any, NoReturn, Protocol

import torch
from shardserve.workers.config import EngineConfig, ResolvedCpuActivations
from shardserve.workers.models.loader import LoadedModel
from shardserve.workers.runner.model_runner import ModelRunner
from shardserve.workers.step_types import ModelRunnerOutput, SchedulerOutput
from shardserve.workers.worker.channel import ConnectionGroup, StepHandle, WorkerGroupError
from shardserve.workers.worker.proc import READY, worker_main
from shardserve.workers.worker.worker import RankReady, WorkerSpec, output_rank

logger = logging.getLogger(__name__)


class Executor(Protocol):
    num_blocks: int
    cpu_activations: ResolvedCpuActivations

    def submit(self, sched: SchedulerOutput) -> StepHandle:
        """Start one step on every rank without waiting for its output."""
        ...

    def collect(self, handle: StepHandle) -> ModelRunnerOutput:
        """The sampled tokens of a submitted step; steps are collected in submission order."""
        ...

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step on every rank; the sampled tokens of the step (submit + collect)."""
        ...

    def check_health(self) -> None:
        """Raise WorkerGroupError if any rank is gone."""
        ...

    def shutdown(self, wait_s: float = 5.0) -> None:
        """Stop every rank, giving them up to `wait_s` to exit on their own (idempotent)."""
        ...


class LocalExecutor:
    """The model runner in the engine's own process."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig, device: torch.device) -> None:
        self.runner = ModelRunner(loaded, config, device)
        self.num_blocks = self.runner.num_blocks
        self.cpu_activations: ResolvedCpuActivations = self.runner.cpu_activations

    def submit(self, sched: SchedulerOutput) -> StepHandle:
        pending = self.runner.launch(sched)
        return StepHandle(pending.seq, pending=pending)

    def collect(self, handle: StepHandle) -> ModelRunnerOutput:
        if handle.pending is None:
            raise ValueError("not a handle of this executor")
        return self.runner.finish(handle.pending)

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute(sched)

    def check_health(self) -> None:
        return None

    def shutdown(self, wait_s: float = 5.0) -> None:
        return None


def ranks_cpu_activations(ready: list[RankReady]) -> ResolvedCpuActivations:
    """The group's resolved cpu_activations: int8 if any rank's kernels use it (all do, in practice)."""
    return "int8" if any(r.cpu_activations == "int8" for r in ready) else "float"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class MultiprocExecutor(ConnectionGroup):
    """world_size local worker processes driven through one pipe each (see channel.py)."""

    def __init__(self, config: EngineConfig, backend: str | None = None, startup_timeout_s: float = 600.0) -> None:
        super().__init__(config.parallel.world_size, output_rank(config), config.parallel.step_timeout_s)
        self.config = config
        ctx = mp.get_context("spawn")
        port = free_port()
        self._procs: list[Any] = []
        for rank in range(self.world_size):
            parent, child = ctx.Pipe(duplex=True)
            spec = WorkerSpec(config, rank, "127.0.0.1", port, backend)
            proc = ctx.Process(target=worker_main, args=(spec, child), name=f"shardserve-rank{rank}", daemon=True)
            proc.start()
            child.close()
            self._add_connection(parent)
            self._procs.append(proc)
        try:
            ready: list[RankReady] = [self._receive(rank, READY, startup_timeout_s) for rank in range(self.world_size)]
        except BaseException:
            self.shutdown()
            raise
        self.rank_num_blocks: list[int] = [r.num_blocks for r in ready]
        self.num_blocks = min(self.rank_num_blocks)
        self.cpu_activations = ranks_cpu_activations(ready)

    # ---- launcher-specific parts of ConnectionGroup -------------------------------------

    def check_health(self) -> None:
        if self._error is not None:
            raise WorkerGroupError(self._error)
        for rank, proc in enumerate(self._procs):
            if not proc.is_alive():
                self._fail(f"worker rank {rank} (pid {proc.pid}) exited with code {proc.exitcode}")

    def shutdown(self, wait_s: float = 5.0) -> None:
        """Ask the ranks to stop and wait up to `wait_s`; then SIGTERM (SIGKILL after a failure, or
        when SIGTERM is not obeyed in 5 s: a rank stopped by SIGSTOP or stuck in native code)."""
        if self._stopped:
            return
        self._stopped = True
        if wait_s > 0:
            self._ask_ranks_to_stop()
        deadline = time.monotonic() + wait_s
        for proc in self._procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        for proc in self._procs:
            if proc.is_alive() and wait_s > 0:
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

    def _death_waitables(self) -> dict[Any, int]:
        return {proc.sentinel: rank for rank, proc in enumerate(self._procs)}

    def _fail_dead(self, rank: int) -> NoReturn:
        proc = self._procs[rank]
        proc.join(timeout=1.0)
        self._fail(f"worker rank {rank} (pid {proc.pid}) died with exit code {proc.exitcode}")

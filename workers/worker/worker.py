"""One rank of a worker group: joins the process groups, loads its shard, runs its part of a step.

A `Worker` is launcher-agnostic: whoever starts the process (`MultiprocExecutor`, a Ray actor)
builds a picklable `WorkerSpec` (engine config, global rank, rendezvous address) and feeds it
steps over its own transport. Construction selects the device (cuda:<rank % visible GPUs>, or
the CPU), joins the process groups (`init_parallel`, parallel/state.py, which also installs the config's
kernel switches, parallel/options.py), loads the model through
the ordinary loader (each layer sizes itself from the installed state and each weight loader
reads only this rank's slice), and builds a ModelRunner, which sizes this rank's KV cache
(`num_blocks`; the executor takes the minimum over ranks) and resolves `cpu_activations`; both go
to the driver once as a `RankReady`.
`execute(scheduler_output)` runs this rank's share of the step (every rank gets the same
SchedulerOutput); the output rank (the last stage's TP rank 0) returns the ModelRunnerOutput,
the others None. Under async scheduling and on pipeline stages the rank loop uses `launch` /
`finish`, so step N+1 is launched before step N is finished (proc.py `_serve_overlapped`).
Steps in flight (the engine's InFlightBatches) run in submission order, one at a time per rank:
buffers reused from step to step are read by step k's kernels before step k+1 writes them, on
the rank's one stream, so nothing here is sized by the depth. `probe_start(probe)` / `probe_stop`
run a measurement the caller passes in (a `RankProbe`, probe.py) around the steps between them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from shardserve.parallel.comm import wait_pipeline_sends
from shardserve.parallel.state import destroy_parallel, init_parallel
from shardserve.workers.config import EngineConfig, ResolvedCpuActivations
from shardserve.workers.heap import freeze_startup_heap
from shardserve.workers.models.loader import load_model, resolve_device, resolve_dtype
from shardserve.workers.runner.model_runner import ModelRunner
from shardserve.workers.runner.step_records import PendingStep
from shardserve.workers.step_types import ModelRunnerOutput, SchedulerOutput
from shardserve.workers.worker.probe import RankInfo, RankProbe

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankReady:
    """What a rank reports once after start-up (proc.py READY).

    num_blocks: KV cache blocks this rank can hold (its own budget).
    cpu_activations: ModelConfig.cpu_activations as this rank's runner resolved it (float | int8).
    """

    num_blocks: int
    cpu_activations: ResolvedCpuActivations


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a rank needs to start (picklable: it crosses the process boundary).

    config: the engine config (parallel sizes in config.parallel).
    rank: global rank in [0, world_size); layout in parallel/state.py.
    master_addr / master_port: the rendezvous of torch.distributed (rank 0's host).
    backend: `nccl`, `gloo`, or None (nccl on CUDA, gloo on CPU).
    num_threads: torch intra-op threads on CPU (None: cpu_count / world_size).
    """

    config: EngineConfig
    rank: int
    master_addr: str
    master_port: int
    backend: str | None = None
    num_threads: int | None = None


def output_rank(config: EngineConfig) -> int:
    """Global rank that returns the ModelRunnerOutput: TP rank 0 of the last pipeline stage."""
    return (config.parallel.pipeline_parallel_size - 1) * config.parallel.tensor_parallel_size


class Worker:
    def __init__(self, spec: WorkerSpec) -> None:
        config, par = spec.config, spec.config.parallel
        self.rank = spec.rank
        device = resolve_device(config.model.device)
        if device.type == "cuda":
            device = torch.device("cuda", spec.rank % torch.cuda.device_count())
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(spec.num_threads or max(1, (os.cpu_count() or 1) // par.world_size))
        self.device = device
        self.state = init_parallel(
            spec.rank, par.world_size, par.tensor_parallel_size, par.pipeline_parallel_size,
            ep=par.expert_parallel_size, master_addr=spec.master_addr, master_port=spec.master_port,
            backend=spec.backend, timeout_s=par.collective_timeout_s, pp_layer_partition=par.pipeline_layer_partition,
            expert_dispatch=par.expert_dispatch, all_to_all_min_tokens=par.all_to_all_min_tokens,
            kernels=par.kernel_options())
        torch.manual_seed(config.model.seed)
        dtype = resolve_dtype(config.model.dtype, device)
        self.loaded = load_model(config.model, device, dtype)
        # Decode graphs would capture the stage-to-stage send/recv: eager under pipeline parallelism.
        self.runner = ModelRunner(self.loaded, config, device)
        self.is_output_rank = spec.rank == output_rank(config)
        self._probe: RankProbe | None = None  # between probe_start and probe_stop
        freeze_startup_heap()  # a full GC pass would stall this rank's steps (workers/heap.py)
        logger.info("rank %d ready: tp %d/%d pp %d/%d ep %d/%d, %d KV blocks", spec.rank, self.state.tp_rank,
                    self.state.tp_size, self.state.pp_rank, self.state.pp_size, self.state.ep_rank,
                    self.state.ep_size, self.runner.num_blocks)

    @property
    def num_blocks(self) -> int:
        """KV cache blocks this rank can hold (its own budget)."""
        return self.runner.num_blocks

    @property
    def ready(self) -> RankReady:
        return RankReady(self.runner.num_blocks, self.runner.cpu_activations)

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput | None:
        output = self.runner.execute(sched)
        return output if self.is_output_rank else None

    # Overlapped steps (async scheduling, proc.py): launch N+1 before finishing N.

    @property
    def overlaps_steps(self) -> bool:
        """Whether this rank launches the next step before finishing the current one: under
        async scheduling, and on every pipeline stage (its steps are other micro-batches)."""
        return self.runner.overlaps_steps

    def launch(self, sched: SchedulerOutput) -> PendingStep:
        return self.runner.launch(sched)

    @staticmethod
    def step_done(pending: PendingStep) -> bool:
        """True once `finish` would not wait: the device has produced the step's sampled ids
        (always true on the CPU, where `launch` runs the whole step)."""
        return pending.copied is None or pending.copied.query()

    @staticmethod
    def must_finish_now(pending: PendingStep) -> bool:
        """A step sampling penalty rows is finished before the next launch (runner rule)."""
        return pending.has_penalties

    def finish(self, pending: PendingStep) -> ModelRunnerOutput | None:
        output = self.runner.finish(pending)
        return output if self.is_output_rank else None

    def note_driver_wait(self, seconds: float) -> None:
        """Seconds from this rank's last finish (output sent) to the driver's next step message,
        from the overlapped loop (StepTimes.driver_s; kept only while timing)."""
        if self.runner.step_times.enabled:
            self.runner.step_times.driver_s.append(seconds)

    def expert_load(self) -> dict[str, list[int]]:
        """Tokens routed to each expert so far, per MoE layer (module name -> counts per expert)."""
        return {name.removesuffix(".expert_load"): buf.tolist()
                for name, buf in self.runner.model.named_buffers() if name.endswith("expert_load")}

    def probe_start(self, probe: RankProbe) -> None:
        """Start `probe` on this rank (a measurement the caller owns: see probe.py)."""
        if self._probe is not None:
            raise RuntimeError(f"rank {self.rank}: probe_start while a probe is already running "
                               "(call probe_stop first)")
        probe.start(RankInfo(self.rank, self.state.tp_rank, self.state.pp_rank, self.state.ep_rank, self.device,
                             self.runner.step_times))
        self._probe = probe

    def probe_stop(self) -> Any:
        """Stop the running probe; its report (picklable: it goes back to the driver)."""
        if self._probe is None:
            raise RuntimeError(f"rank {self.rank}: probe_stop without a running probe (call probe_start first)")
        probe, self._probe = self._probe, None
        return probe.stop()

    def ping(self) -> int:
        """Health probe: answers with this rank."""
        return self.rank

    def shutdown(self) -> None:
        wait_pipeline_sends()  # the next stage may still be reading our last activations
        destroy_parallel()

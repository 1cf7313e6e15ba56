"""The driver's own cost per step: the engine loop with an executor that answers at once.

Why: under pipeline parallelism the driver turns every micro-batch around (collect, fold the
tokens into the scheduler, schedule the next batch, submit it, build the outputs) while the
stages compute, and async scheduling cannot hide that work as it does at P = 1. If the driver
needs longer per micro-batch than a stage needs to compute it, the driver bounds throughput
whatever the stages do. This script measures that bound without a GPU: the real LLMEngine
(scheduler, KV manager, output processor) on a real model config (no weights), with
`make_executor` swapped for `InstantExecutor`, which samples token 1000 + step for every
sampling request the moment a batch is submitted. Everything else is the production code path.

Printed: driver wall per engine step and per request-step, and the output tokens/s the driver
alone could sustain (its cap), with a cProfile breakdown of the top functions by own time
(`--profile`). Compare the cap with the measured PP throughput (benchmarks/README.md).

Run (CPU is fine; the driver never touches a device):
    python benchmarks/driver_overhead.py --num-requests 3072 --max-num-seqs 1536 --micro-batches 3
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from dataclasses import dataclass

import torch
from shardserve.workers import engine as engine_module
from shardserve.workers.bench.runs import run_engine
from shardserve.workers.bench.workload import Workload
from shardserve.workers.config import EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from shardserve.workers.models.loader import load_model
from shardserve.workers.step_types import ModelRunnerOutput, SchedulerOutput
from shardserve.workers.worker.channel import StepHandle


class InstantExecutor:
    """An executor whose steps finish at submit: token 1000 + step number for each sampling row."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.cpu_activations = "float"  # what a runner would have resolved (Executor protocol)
        self._num_submitted = 0

    def submit(self, sched: SchedulerOutput) -> StepHandle:
        self._num_submitted += 1
        token = 1000 + self._num_submitted % 1000
        output = ModelRunnerOutput(sampled_token_ids={r.request_id: token for r in sched.scheduled if r.sample})
        return StepHandle(self._num_submitted, output=output)

    def collect(self, handle: StepHandle) -> ModelRunnerOutput:
        assert handle.output is not None
        return handle.output

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self.collect(self.submit(sched))

    def check_health(self) -> None:
        return None

    def shutdown(self) -> None:
        return None


def build_engine(args: argparse.Namespace) -> engine_module.LLMEngine:
    config = EngineConfig(
        model=ModelConfig(model=args.model, dtype="float32", device="cpu"),
        scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens),
        parallel=ParallelConfig(pipeline_parallel_size=args.pp, pipeline_micro_batches=args.micro_batches),
    )
    # The config and tokenizer only, whatever the world size (an 8B model's weights at P = 1
    # would need ~32 GB of host memory for nothing).
    loaded = load_model(config.model, torch.device("cpu"), torch.float32, weights=False)
    original = engine_module.make_executor
    engine_module.make_executor = lambda config, loaded, device: InstantExecutor(args.num_blocks)
    try:
        return engine_module.LLMEngine(config, loaded=loaded)
    finally:
        engine_module.make_executor = original


@dataclass(frozen=True)
class DriverResult:
    num_finished: int
    output_tokens: int
    engine_steps: int
    seconds: float


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dummy:llama-3.1-8b")
    parser.add_argument("--num-requests", type=int, default=3072)
    parser.add_argument("--input-len", type=int, default=200)
    parser.add_argument("--output-len", type=int, default=180)
    parser.add_argument("--distribution", default="fixed", choices=["fixed", "lognormal"])
    parser.add_argument("--max-num-seqs", type=int, default=1536)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--micro-batches", type=int, default=None, help="default: the engine's (P)")
    parser.add_argument("--num-blocks", type=int, default=60_000, help="KV blocks the fake executor reports")
    parser.add_argument("--profile", action="store_true", help="cProfile the run: top functions by own time")
    return parser.parse_args(argv)


def measure(engine: engine_module.LLMEngine, args: argparse.Namespace,
            profiler: cProfile.Profile | None = None) -> DriverResult:
    """Queue the workload and step the engine until every request finished."""
    requests = Workload(args.num_requests, args.input_len, args.output_len, args.distribution).sample(
        engine.loaded.hf_config.vocab_size)
    walls: list[float] = []
    start = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    finals = run_engine(engine, requests, walls)
    if profiler is not None:
        profiler.disable()
    return DriverResult(len(finals), sum(len(f.outputs[0].token_ids) for f in finals), len(walls),
                        time.perf_counter() - start)


def main() -> None:
    args = parse_args()
    engine = build_engine(args)
    profiler = cProfile.Profile() if args.profile else None
    result = measure(engine, args, profiler)
    micro = engine.max_batches_in_flight
    print(f"{args.model} PP {args.pp} x {micro} batches in flight, {args.num_requests} requests "
          f"{args.distribution} {args.input_len}/{args.output_len}, max_num_seqs {args.max_num_seqs}"
          f"{' (cProfile on: slower)' if profiler else ''}")
    print(f"driver: {result.engine_steps} engine steps in {result.seconds:.2f} s = "
          f"{result.seconds / result.engine_steps * 1e3:.2f} ms per step, "
          f"{result.seconds / result.output_tokens * 1e6:.2f} us per output token; "
          f"cap {result.output_tokens / result.seconds:,.0f} output tok/s")
    if profiler is not None:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
        print(text.getvalue())


if __name__ == "__main__":
    main()

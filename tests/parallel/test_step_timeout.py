"""A rank that hangs (SIGSTOP: alive, silent, its socket open) fails the engine's step in bounded
time instead of hanging it, through either timeout of ParallelConfig:

- step_timeout_s: the driver stops waiting for the step's output and declares the group dead;
- collective_timeout_s: the live rank's all-reduce with the stalled peer times out (gloo), the
  rank reports the error and exits, and the driver fails the step with that rank's traceback;
- a write to ranks that read nothing, once their socket buffers are full, fails after
  step_timeout_s too (the driver never blocks for ever in `submit` either).

Either way every rank process is gone afterwards (the stopped one included: a failed group is
SIGKILLed, not asked to stop) and every later step raises WorkerGroupError. The YAML fields reach
the engine's ParallelConfig unchanged and out-of-range values are refused with the field's name.
TP 2 on CPU (gloo) with the local multiprocess launcher; the served (Ray) path is in
tests/cluster/test_worker_death.py.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest
from parallel_helpers import engine_config, make_prompts, write_checkpoint
from shardserve.workers.engine import LLMEngine
from shardserve.workers.request import SamplingParams
from shardserve.workers.worker.executor import MultiprocExecutor, WorkerGroupError

SHORT_S = 3.0  # the timeout under test
LONG_S = 120.0  # the other timeout: must not be the one that fires
SLACK_S = 6.0  # detection + SIGKILLing the group on a loaded 2-core machine (measured: 0.1 s idle)
VICTIM = 1  # TP rank 1: rank 0 is the output rank, left waiting in the all-reduce


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return write_checkpoint("llama", tmp_path_factory.mktemp("ckpt") / "llama")


def running_engine(folder: Path, collective_timeout_s: float, step_timeout_s: float) -> LLMEngine:
    config = engine_config(folder, tp=2)
    config = replace(config, parallel=replace(config.parallel, collective_timeout_s=collective_timeout_s,
                                              step_timeout_s=step_timeout_s))
    engine = LLMEngine(config)
    assert isinstance(engine.executor, MultiprocExecutor)
    for request_id, prompt in make_prompts(250).items():
        engine.add_request(request_id, prompt, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    for _ in range(3):  # running: prefill and decode steps went through both ranks
        engine.step()
    return engine


def stall_rank_and_time_failure(engine: LLMEngine, stopped_pids: list[int], match: str) -> tuple[float, str]:
    executor = engine.executor
    pid = executor._procs[VICTIM].pid
    os.kill(pid, signal.SIGSTOP)
    stopped_pids.append(pid)
    start = time.monotonic()
    with pytest.raises(WorkerGroupError, match=match) as err:
        while time.monotonic() - start < LONG_S:
            engine.step()
    elapsed = time.monotonic() - start
    assert not any(p.is_alive() for p in executor._procs), "a rank of the failed group is still running"
    with pytest.raises(WorkerGroupError):
        engine.step()
    return elapsed, str(err.value)


def test_stalled_rank_fails_the_step_after_step_timeout(llama, stopped_pids) -> None:
    engine = running_engine(llama, collective_timeout_s=LONG_S, step_timeout_s=SHORT_S)
    try:
        elapsed, message = stall_rank_and_time_failure(engine, stopped_pids, r"did not answer within 3 s")
        assert "parallel.step_timeout_s = 3" in message, message
        assert SHORT_S - 0.5 <= elapsed < SHORT_S + SLACK_S, f"failed after {elapsed:.1f} s"
    finally:
        engine.shutdown()


def test_hung_collective_times_out_on_the_live_rank(llama, stopped_pids) -> None:
    engine = running_engine(llama, collective_timeout_s=SHORT_S, step_timeout_s=LONG_S)
    try:
        # Rank 0 (alive) waits in the TP all-reduce for the stopped rank 1 until gloo gives up.
        elapsed, message = stall_rank_and_time_failure(engine, stopped_pids, r"worker rank 0 failed")
        assert "a collective timed out after parallel.collective_timeout_s = 3 s" in message, message
        assert "Timed out waiting 3000ms" in message, message  # gloo's own words, from the rank's traceback
        assert SHORT_S - 0.5 <= elapsed < SHORT_S + SLACK_S, f"failed after {elapsed:.1f} s"
    finally:
        engine.shutdown()


@pytest.mark.timeout(180)  # without a bound on the driver's writes this test blocks in `submit`
def test_write_to_a_stalled_rank_fails_after_step_timeout(llama, stopped_pids) -> None:
    """Steps keep being submitted to ranks that read nothing (rank 1 stopped, rank 0 waiting for it in the
    all-reduce) until the socket buffers are full: the blocked write fails after step_timeout_s."""
    engine = running_engine(llama, collective_timeout_s=LONG_S, step_timeout_s=SHORT_S)
    executor = engine.executor
    submitted = []
    real_submit = executor.submit
    executor.submit = lambda sched: (submitted.append(sched), real_submit(sched))[1]
    try:
        engine.step()  # records one real step's SchedulerOutput
        pid = executor._procs[VICTIM].pid
        os.kill(pid, signal.SIGSTOP)
        stopped_pids.append(pid)
        sends = 0
        with pytest.raises(WorkerGroupError, match=r"could not send to a worker within parallel\.step_timeout_s = 3 s"):
            while True:
                start = time.monotonic()  # the last submit is the one that blocks
                real_submit(submitted[-1])
                sends += 1
        elapsed = time.monotonic() - start
        assert sends > 10, "the write failed before any socket buffer could fill"
        assert SHORT_S - 0.5 <= elapsed < SHORT_S + SLACK_S, f"the blocked write failed after {elapsed:.1f} s"
        assert not any(p.is_alive() for p in executor._procs), "a rank of the failed group is still running"
    finally:
        engine.shutdown()


def test_yaml_timeouts_reach_the_engine_and_are_range_checked() -> None:
    from shardserve.cluster.config import ConfigError, ModelSection, parse_config
    from shardserve.workers.config import ParallelConfig

    section = ModelSection.model_validate(
        {"name": "m", "parallel": {"tensor_parallel_size": 2, "collective_timeout_s": 7.5, "step_timeout_s": 20}})
    parallel = section.to_engine_config().parallel
    assert (parallel.collective_timeout_s, parallel.step_timeout_s) == (7.5, 20.0)
    defaults = ModelSection.model_validate({"name": "m"}).to_engine_config().parallel
    assert (defaults.collective_timeout_s, defaults.step_timeout_s) == (300.0, 600.0)
    for field, value, rule in (("step_timeout_s", 0, r"> 0\.0"), ("collective_timeout_s", -1, r"> 0\.0"),
                               ("step_timeout_s", 90000, r"<= 86400\.0")):
        with pytest.raises(ConfigError, match=rf"models\[0\]\.parallel\.{field}: must be {rule}, got {value}"):
            parse_config({"models": [{"name": "m", "parallel": {field: value}}]})
        with pytest.raises(ValueError, match=rf"{field} must be in \(0, 86400\] seconds, got {value}"):
            ParallelConfig(**{field: value})

"""A rank that dies mid-run fails the engine's step with a clear error in bounded time: a TP
rank, and either pipeline stage (PP ranks read their pipe on the inbox thread and run the
overlapped loop; the first stage's death leaves the last one blocked on a receive)."""

from __future__ import annotations

import os
import signal
import time

import pytest
from parallel_helpers import engine_config, make_prompts, write_checkpoint
from shardserve.workers.engine import LLMEngine
from shardserve.workers.request import SamplingParams
from shardserve.workers.worker.executor import MultiprocExecutor, WorkerGroupError


@pytest.mark.parametrize("tp,pp,victim", [(2, 1, 1), (1, 2, 0), (1, 2, 1)])
def test_killed_rank_fails_step_quickly(tmp_path, tp: int, pp: int, victim: int) -> None:
    folder = write_checkpoint("llama", tmp_path / "llama")
    engine = LLMEngine(engine_config(folder, tp=tp, pp=pp))
    executor = engine.executor
    assert isinstance(executor, MultiprocExecutor)
    try:
        for request_id, prompt in make_prompts(250).items():
            engine.add_request(request_id, prompt, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
        engine.step()
        engine.step()
        assert executor.num_steps >= 1 and executor.host_time_s > 0
        os.kill(executor._procs[victim].pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(WorkerGroupError, match=r"worker rank \d"):
            for _ in range(5):  # the next step fails; the loop only covers a step that raced the kill
                engine.step()
        assert time.monotonic() - start < 15.0
        assert not any(p.is_alive() for p in executor._procs), "surviving ranks were not stopped"
        with pytest.raises(WorkerGroupError):
            engine.step()
    finally:
        engine.shutdown()

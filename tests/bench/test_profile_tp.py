"""Kernel profiles of worker ranks (benchmarks/kernel_profile.py: a KernelProfileProbe through
Worker.probe_start/stop) and benchmarks/profile_tp.py: a TP 2 engine on CPU (gloo, spawned ranks)
profiles every rank around steps taken with a batch in flight (async scheduling), a misused probe
call fails only the call, and the script's smoke run writes every case with each rank's kernels."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from shardserve.workers.config import EngineConfig, ModelConfig, ParallelConfig
from shardserve.workers.engine import LLMEngine
from shardserve.workers.request import SamplingParams
from shardserve.workers.worker.channel import WorkerCallError

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))  # the lab's kernel_profile.py (the spawned ranks inherit sys.path)

from kernel_profile import CATEGORIES, KernelProfileProbe, profile_ranks, summarize  # noqa: E402

SCRIPT = BENCH / "profile_tp.py"
MATMUL = re.compile(r"aten::(mm|addmm|linear|matmul)$")


def _config(tp: int) -> EngineConfig:
    return EngineConfig(model=ModelConfig(model="dummy:tiny-llama", dtype="float32", device="cpu"),
                        parallel=ParallelConfig(tensor_parallel_size=tp, collective_timeout_s=60.0,
                                                step_timeout_s=60.0))


def test_tp2_ranks_profile_steps_and_misuse_fails_only_the_call() -> None:
    engine = LLMEngine(_config(2))
    try:
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        engine.add_request("r", list(range(1, 20)), params)
        engine.step()
        engine.step()
        assert engine.stats().num_batches_in_flight == 1  # async scheduling: the calls meet a step in flight
        profiles = profile_ranks(engine, lambda: [engine.step() for _ in range(3)])

        assert [(p.rank, p.tp_rank, p.pp_rank) for p in profiles] == [(0, 0, 0), (1, 1, 0)]
        for p in profiles:
            names = {name for name, _ in p.kernels}
            assert p.kernels and any(MATMUL.match(n) for n in names), sorted(names)
            assert all(us >= 0 for _, us in p.kernels)
            summary = summarize(p.as_kernels(), 3, is_moe=False)
            assert summary["categories_ms_per_step"]["communication"] > 0  # the TP all-reduces

        with pytest.raises(WorkerCallError, match="probe_stop without a running probe"):
            engine.executor.call("probe_stop")
        engine.executor.call("probe_start", KernelProfileProbe())
        with pytest.raises(WorkerCallError, match="probe_start while a probe is already running"):
            engine.executor.call("probe_start", KernelProfileProbe())
        assert [p.kernels for p in engine.executor.call("probe_stop")] == [(), ()]  # nothing ran in between
        with pytest.raises(ValueError, match="worker call must be one of"):
            engine.executor.call("shutdown")

        # The group still serves, and no output was lost or reordered by the calls.
        finals = []
        while engine.has_unfinished_requests():
            finals += [out for out in engine.step() if out.finished]
        assert [len(out.outputs[0].token_ids) for out in finals] == [12]
        assert engine.executor.call("ping") == [0, 1]
    finally:
        engine.shutdown()


def test_profile_ranks_needs_worker_ranks() -> None:
    engine = LLMEngine(_config(1))
    with pytest.raises(TypeError, match="profile_gpu.py"):
        profile_ranks(engine, lambda: None)


def test_profile_tp_cpu_smoke(tmp_path: Path) -> None:
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--tp", "2", "--model", "dummy:tiny-llama", "--small",
           "--out", str(tmp_path), "--warmup", "1", "--timed", "2", "--steps", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread: no spin-waits when the CPU is shared
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "profile_tp.json").read_text())
    assert (summary["tp"], summary["async_scheduling"]) == (2, True)
    assert list(summary["cases"]) == ["b1", "decode64"]
    for case in summary["cases"].values():
        name = case["name"]
        assert case["step_wall_ms"] > 0 and case["step_wall_profiled_ms"] > 0, name
        assert case["batches_collected"] == case["profiled_steps"] == 2, name
        assert [r["tp_rank"] for r in case["ranks"]] == [0, 1], name
        for rank in case["ranks"]:
            assert rank["kernels_per_step"] > 0 and rank["top_kernels"], name
            split = rank["categories_ms_per_step"]
            assert tuple(split) == CATEGORIES, name
            assert math.isclose(sum(split.values()), rank["kernel_ms_per_step"], rel_tol=1e-6, abs_tol=1e-9), name
        assert case["categories_ms_per_step_max"]["communication"] > 0, name
        assert case["kernel_ms_per_step_max"] == max(r["kernel_ms_per_step"] for r in case["ranks"]), name
    # The last lines: the "====" line with the device name, column heads, one row per case.
    tail = proc.stdout.strip().splitlines()[-len(summary["cases"]) - 2:]
    assert tail[0].startswith("====") and summary["device"] in tail[0], tail
    assert [line.split()[0] for line in tail[2:]] == list(summary["cases"]), tail

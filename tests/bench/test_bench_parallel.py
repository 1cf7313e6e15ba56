"""`shardserve bench latency|throughput` with model parallelism (cluster/commands/bench.py,
workers/bench/cli_runs.py, workers/bench/runs.py): on CPU, TP 2 and PP 2 engines (gloo, two
spawned worker ranks) run both benchmarks through the CLI in this process, report positive
figures, name the parallel layout and the driver wall-clock timing; the per-GPU bytes come from
the model config; a bad flag value exits with code 2 and a message naming the flag, the field
and its range (no traceback, no worker started); a world of one prints what it always did."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from shardserve.cluster.cli import main
from shardserve.workers.bench.runs import decode_bytes_per_step, rank_bytes
from shardserve.workers.config import EngineConfig, ModelConfig, ParallelConfig
from shardserve.workers.engine import LLMEngine

MODEL = ["--model", "dummy:tiny-llama", "--device", "cpu", "--dtype", "float32"]


def _bench(tmp_path: Path, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[dict, str]:
    out = tmp_path / "bench.json"
    assert main(["bench", *argv, *MODEL, "--json", str(out)]) == 0
    return json.loads(out.read_text()), capsys.readouterr().out


def _config(tp: int = 1, pp: int = 1, ep: int = 1, model: str = "dummy:tiny-llama") -> EngineConfig:
    return EngineConfig(model=ModelConfig(model=model, dtype="float32", device="cpu"),
                        parallel=ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp,
                                                expert_parallel_size=ep))


def _per_gpu_bytes(config: EngineConfig, engine: LLMEngine, batch: int, context: float) -> int:
    """The docstring's convention: the busiest rank of each stage, summed over the stages."""
    stages: dict[int, float] = {}
    for r in rank_bytes(config, engine.loaded.hf_config, torch.float32):
        stages[r.pp_rank] = max(stages.get(r.pp_rank, 0.0), r.weight_bytes + batch * context * r.kv_bytes_per_token)
    return int(sum(stages.values()))


def _check_latency_rows(result: dict, batch_sizes: list[int], hf: bool) -> None:
    assert [row["batch_size"] for row in result["results"]] == batch_sizes
    for row in result["results"]:
        for key in ("step_time_s", "tokens_per_s", "decode_tokens_per_s", "bytes_per_step", "achieved_bandwidth",
                    "wall_ms_per_step"):
            assert row[key] > 0, (key, row)
        # the slowest rank's host time; GPU time needs CUDA events (NaN on CPU)
        assert row["host_ms_per_step"] > 0 and math.isnan(row["gpu_ms_per_step"])
        ranks = row["ranks"]
        assert [r["rank"] for r in ranks] == list(range(len(ranks))) and len(ranks) > 1
        sampling = [r for r in ranks if r["steps"] > 0]  # a PP stage before the last samples nothing
        assert sampling and row["host_ms_per_step"] == max(r["host_ms"] for r in sampling)
        for r in sampling:
            assert r["steps"] >= 8 and 0 < r["launch_ms"] <= r["host_ms"], r  # --output-len 8 (PP: a step per micro-batch)
        assert row["achieved_bandwidth"] == pytest.approx(row["bytes_per_step"] / row["step_time_s"])
        assert (row["hf_tokens_per_s"] is not None and row["hf_tokens_per_s"] > 0) == hf


def test_latency_tp2_with_transformers_baseline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result, out = _bench(tmp_path, capsys, "latency", "-tp", "2", "--batch-sizes", "1,2", "--input-len", "8",
                         "--output-len", "8")
    _check_latency_rows(result, [1, 2], hf=True)
    assert result["parallel"] == {"tensor_parallel_size": 2, "pipeline_parallel_size": 1, "expert_parallel_size": 1,
                                  "pipeline_micro_batches": None, "world_size": 2, "label": "TP 2"}
    assert result["step_timing"] == "driver wall clock"
    assert "parallel: TP 2; 2 worker processes (tensor_parallel_size 2," in out
    assert "step time: driver wall clock (TP 2); wall ms = median engine.step() on the driver" in out
    assert re.search(r"batch 2 rank 1: 8 steps, launch [0-9.]+ ms", out)
    assert "HF: transformers generate on one device (cpu) with the whole model" in out
    lines = out.strip().splitlines()
    table = lines.index(next(line for line in lines if line.split()[:1] == ["batch"]))
    assert lines[table].split() == ["batch", "step", "ms", "wall", "ms", "host", "ms", "GPU", "ms", "dec", "tok/s",
                                    "GB/s", "of", "copy", "HF", "tok/s", "ratio"]
    assert [line.split()[0] for line in lines[table + 1:table + 3]] == ["1", "2"]
    # Per-GPU bytes: one rank's half of the layers' weights and of the KV heads (context 8 + 8 / 2).
    single = LLMEngine(_config())
    config = _config(tp=2)
    for row in result["results"]:
        b = row["batch_size"]
        assert row["bytes_per_step"] == _per_gpu_bytes(config, single, b, 12.0)
        assert row["bytes_per_step"] < decode_bytes_per_step(single, b, 12.0)


def test_throughput_tp2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result, out = _bench(tmp_path, capsys, "throughput", "-tp", "2", "--num-requests", "6", "--input-len", "16",
                         "--output-len", "8", "--no-hf")
    ours = result["ours"]
    assert ours["num_requests"] == 6 and ours["output_tokens"] == 48
    for key in ("output_tokens_per_s", "requests_per_s", "mean_ttft_s", "mean_tpot_s"):
        assert ours[key] > 0, key
    assert result["parallel"]["label"] == "TP 2" and result["hf_output_tokens_per_s"] is None
    # Cost counts both devices.
    assert result["cost_per_million_output_tokens"] == pytest.approx(2.5 * 2 / 3600 / ours["output_tokens_per_s"] * 1e6)
    assert "parallel: TP 2; 2 worker processes" in out and "at $2.5/h x 2 devices" in out


def test_latency_pp2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result, out = _bench(tmp_path, capsys, "latency", "-pp", "2", "--pipeline-micro-batches", "3", "--batch-sizes",
                         "1,3", "--input-len", "8", "--output-len", "8", "--no-hf")
    _check_latency_rows(result, [1, 3], hf=False)
    assert result["parallel"]["label"] == "PP 2" and result["parallel"]["pipeline_micro_batches"] == 3
    assert "parallel: PP 2; 2 worker processes (tensor_parallel_size 1, pipeline_parallel_size 2, " \
           "expert_parallel_size 1, pipeline_micro_batches 3)" in out
    assert "step time: driver wall clock (PP 2); wall ms = median engine.step() on the driver" in out
    # A step crosses both stages: the per-GPU bytes summed over them are the whole model's.
    single = LLMEngine(_config())
    for row in result["results"]:
        assert row["bytes_per_step"] == decode_bytes_per_step(single, row["batch_size"], 12.0)


@pytest.mark.parametrize(("flags", "expected"), [
    (["-tp", "0"], "--tensor-parallel-size/-tp: tensor_parallel_size must be >= 1, got 0"),
    (["-pp", "-1"], "--pipeline-parallel-size/-pp: pipeline_parallel_size must be >= 1, got -1"),
    (["-pp", "2", "--pipeline-micro-batches", "5"],
     "--pipeline-micro-batches: pipeline_micro_batches must be in [pipeline_parallel_size, "
     "2 x pipeline_parallel_size] = [2, 4], got 5"),
    (["--pipeline-micro-batches", "2"], "--pipeline-micro-batches: pipeline_micro_batches must be None"),
    (["-tp", "2", "-ep", "3"], "--expert-parallel-size/-ep: expert_parallel_size 3 must divide tensor_parallel_size 2"),
    # Sizes the model cannot be split by are caught on the meta device, before any rank starts.
    (["-pp", "4"], "--pipeline-parallel-size/-pp: dummy:tiny-llama cannot be split as PP 4: "
                   "pipeline_parallel_size 4 exceeds the model's 2 layers"),
])
@pytest.mark.parametrize("kind", ["latency", "throughput"])
def test_bad_parallel_values_exit_2_with_the_range(kind: str, flags: list[str], expected: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", kind, *MODEL, "--no-hf", *flags]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"shardserve bench {kind}: {expected}"), captured.err
    assert "Traceback" not in captured.err + captured.out


def test_bad_async_depth_exits_2_with_the_range(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "latency", *MODEL, "--no-hf", "--async-depth", "5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("shardserve bench latency: --async-depth: async_depth must be an integer in [2, 4], got 5"), err


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="the machine has the GPUs")
def test_more_ranks_than_gpus_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "latency", "--model", "dummy:tiny-llama", "--device", "cuda", "-tp", "2", "--no-hf"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--tensor-parallel-size/-tp: tensor_parallel_size x pipeline_parallel_size = 2 needs 2 GPUs" in err


def test_rank_bytes_split_the_single_device_bytes() -> None:
    """Meta-device shards: world 1 equals the loaded model's count; PP stages add up to it; TP
    ranks each hold half the KV heads and at least half the weights (norms are replicated)."""
    for model in ("dummy:tiny-llama", "dummy:tiny-qwen3", "dummy:tiny-qwen3-moe"):  # tied, untied, MoE
        single = LLMEngine(_config(model=model))
        hf_config = single.loaded.hf_config
        (one,) = rank_bytes(_config(model=model), hf_config, torch.float32)
        assert one.weight_bytes + 5 * 10.0 * one.kv_bytes_per_token == decode_bytes_per_step(single, 5, 10.0)
        stages = rank_bytes(_config(pp=2, model=model), hf_config, torch.float32)
        assert [r.pp_rank for r in stages] == [0, 1]
        assert sum(r.weight_bytes for r in stages) == one.weight_bytes
        assert sum(r.kv_bytes_per_token for r in stages) == one.kv_bytes_per_token
        for ep in (1, 2):
            ranks = rank_bytes(_config(tp=2, ep=ep, model=model), hf_config, torch.float32)
            assert [r.kv_bytes_per_token for r in ranks] == [one.kv_bytes_per_token // 2] * 2
            assert ranks[0].weight_bytes == ranks[1].weight_bytes
            assert one.weight_bytes / 2 <= ranks[0].weight_bytes < one.weight_bytes * 0.55


def test_world_of_one_prints_as_before(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result, out = _bench(tmp_path, capsys, "latency", "--batch-sizes", "1", "--input-len", "8", "--output-len", "8",
                         "--no-hf")
    lines = out.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("device: CPU ") and "copy bandwidth" in lines[0]
    assert lines[1].split() == ["batch", "step", "ms", "host", "ms", "GPU", "ms", "dec", "tok/s", "GB/s", "of", "copy",
                                "HF", "tok/s", "ratio"]
    assert "parallel" not in result and "wall_ms_per_step" not in result["results"][0]

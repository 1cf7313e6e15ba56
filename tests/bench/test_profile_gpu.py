"""benchmarks/profile_gpu.py: the CPU smoke run (the script as the lead runs it, in a subprocess)
writes every case with the batch shape it promised and a category split that adds up, and the
category rule table (benchmarks/kernel_profile.py) files the kernel names of our GPU runs where
the docstring says."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))  # the lab's kernel_profile.py, and profile_gpu.py imports it

from kernel_profile import categorize  # noqa: E402

SCRIPT = BENCH / "profile_gpu.py"


def _load_script():
    if "profile_gpu" not in sys.modules:  # registered first: its dataclasses look their module up
        spec = importlib.util.spec_from_file_location("profile_gpu", SCRIPT)
        sys.modules["profile_gpu"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["profile_gpu"])
    return sys.modules["profile_gpu"]


def _smoke(out: Path, *extra: str) -> dict:
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--out", str(out), "--small", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread: no spin-waits when the CPU is shared
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "profile_gpu.json").read_text())
    # The last lines: the "====" line with the device name, column heads, one row per case.
    lines = proc.stdout.strip().splitlines()
    tail = lines[-len(summary["cases"]) - 2:]
    assert tail[0].startswith("====") and summary["device"] in tail[0], tail
    assert [line.split()[0] for line in tail[2:]] == list(summary["cases"]), tail
    return summary


def _check_case(case: dict, categories: tuple[str, ...]) -> None:
    name = case["name"]
    assert case["step_wall_ms"] > 0 and case["step_wall_unprofiled_ms"] > 0, name
    assert case["kernels_per_step"] > 0 and case["kernel_ms_per_step"] > 0, name
    split = case["categories_ms_per_step"]
    assert tuple(split) == categories, name
    assert all(ms >= 0 for ms in split.values()), name
    assert math.isclose(sum(split.values()), case["kernel_ms_per_step"], rel_tol=1e-6, abs_tol=1e-9), name
    top = case["top_kernels"]
    assert top and all(a["ms_per_step"] >= b["ms_per_step"] for a, b in zip(top, top[1:], strict=False)), name
    # Every profiled batch has the case's shape: its decode rows plus its fresh prompts, whole.
    assert case["batches"] == case["profiled_steps"] == len(case["tokens_per_batch"]), name
    rows = case["decode_rows"] + case["prefill_prompts"]
    tokens = case["decode_rows"] + case["prefill_prompts"] * case["prefill_len"]
    assert case["rows_per_batch"] == [rows] * case["batches"], name
    assert case["tokens_per_batch"] == [tokens] * case["batches"], name
    assert case["preemptions"] == 0, name
    assert (case["floor_ms"] is None) == bool(case["prefill_prompts"]), name


def test_cpu_smoke_dense(tmp_path: Path) -> None:
    summary = _smoke(tmp_path, "--model", "dummy:tiny-llama")
    categories = _load_script().CATEGORIES
    assert list(summary["cases"]) == ["b1", "b1_eager", "decode400", "mixed"]
    for case in summary["cases"].values():
        _check_case(case, categories)
    assert summary["cases"]["mixed"]["tokens_per_batch"][0] > summary["cases"]["decode400"]["tokens_per_batch"][0]


def test_cpu_smoke_moe_with_num_layers(tmp_path: Path) -> None:
    summary = _smoke(tmp_path, "--model", "dummy:tiny-qwen3-moe", "--num-layers", "1", "--cases", "b1,mixed")
    assert summary["num_layers"] == 1 and summary["is_moe"]
    assert summary["model"] == "dummy:tiny-qwen3-moe-1l"
    assert list(summary["cases"]) == ["b1", "mixed"]
    for case in summary["cases"].values():
        _check_case(case, _load_script().CATEGORIES)


@pytest.mark.parametrize(("name", "in_sampler", "is_moe", "category"), [
    ("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT", False, False, "gemm"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", False, False, "gemm"),
    ("_moe_gemm_kernel", False, True, "moe"),
    ("_moe_route_kernel", False, True, "moe"),
    ("_moe_sum_kernel", False, True, "moe"),
    ("_decode_stage1", False, False, "attention"),
    ("_extend_kernel", False, False, "attention"),
    ("_rmsnorm_kernel", False, False, "norm"),
    ("_rotary_kernel", False, False, "rotary/kv-write"),
    ("_kv_cache_write_kernel", False, False, "rotary/kv-write"),
    ("_silu_and_mul_kernel", False, False, "activation"),
    ("void at::native::reduce_kernel<512, 1, ArgMaxOps<float>>", False, False, "sampling/logits"),
    ("void at::native::elementwise_kernel<128, 2, exp>", True, False, "sampling/logits"),  # by the sampler range
    ("void (anonymous namespace)::cunn_SoftMaxForward<4, float>", False, True, "moe"),  # the router
    ("void (anonymous namespace)::cunn_SoftMaxForward<4, float>", True, True, "sampling/logits"),
    ("Memcpy HtoD (Pinned -> Device)", True, False, "memcpy/memset"),
    ("Memset (Device)", False, False, "memcpy/memset"),
    ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL", False, False, "communication"),
    ("void at::native::indexSelectLargeIndex<c10::BFloat16>", False, False, "other"),
    ("aten::mm", False, False, "gemm"),
])
def test_category_rules(name: str, in_sampler: bool, is_moe: bool, category: str) -> None:
    assert categorize(name, in_sampler, is_moe) == category

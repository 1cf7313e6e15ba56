"""Programmatic dependent launch (parallel/kernels/pdl.py): when it is on, and what it compiles to.

The launches themselves need a Hopper GPU (the compiled kernel tests and the device benchmarks
run them there); here, on CPU: the switch, and the PTX of every PDL kernel compiled for sm_90
with USE_PDL on and off — the grid-dependency wait must come before the kernel's first global
memory access, or a kernel scheduled early could read what the previous one is still writing.
"""

from __future__ import annotations

import re

import pytest
import torch
from compiled_ptx import compile_ptx
from shardserve.parallel.kernels import pdl
from shardserve.parallel.options import DEFAULT_KERNEL_OPTIONS, KernelOptions, set_kernel_options


def test_off_on_cpu_and_under_the_interpreter(monkeypatch):
    assert pdl.pdl_options(torch.device("cpu")) == {"USE_PDL": False}
    on, off = KernelOptions(pdl=True), KernelOptions(pdl=False)
    assert not pdl.pdl_wanted(on, {"TRITON_INTERPRET": "1"})
    assert not pdl.pdl_wanted(off, {})
    assert pdl.pdl_wanted(on, {})
    assert pdl.pdl_wanted(on, {"TRITON_INTERPRET": "0"})
    set_kernel_options(off)  # what init_parallel / the engine install from parallel.pdl
    try:
        assert not pdl.pdl_wanted(environ={})
    finally:
        set_kernel_options(DEFAULT_KERNEL_OPTIONS)
    assert pdl.pdl_wanted(environ={})


def test_this_triton_supports_it():
    # CI's Triton (3.9) and the GPU machine's (3.6) both have `launch_pdl`; if a Triton without it
    # came in, the engine would silently lose PDL — fail here instead.
    assert pdl.triton_has_pdl()


_BF16 = "*bf16"
KERNELS = {  # module, kernel, pointers, constexprs, floats
    "rmsnorm": ("rmsnorm", "_rmsnorm_kernel",
                {"x_ptr": _BF16, "residual_ptr": _BF16, "weight_ptr": _BF16, "out_ptr": _BF16,
                 "new_residual_ptr": _BF16}, {"HAS_RESIDUAL": True, "BLOCK": 4096}, {"eps"}),
    "silu": ("activation", "_silu_and_mul_kernel", {"x_ptr": _BF16, "out_ptr": _BF16}, {"BLOCK": 1024}, set()),
    "kv_write": ("kv_cache_write", "_kv_cache_write_kernel",
                 {"k_ptr": _BF16, "v_ptr": _BF16, "cache_ptr": _BF16, "slot_mapping_ptr": "*i64"},
                 {"NUM_KV_HEADS": 8, "HEADS_PAD": 8, "HEAD_DIM": 128, "DIM_PAD": 128, "BLOCK_SIZE": 16}, set()),
    "rotary": ("rotary", "_rotary_kernel",
               {"q_ptr": _BF16, "k_ptr": _BF16, "positions_ptr": "*i64", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
                "v_ptr": _BF16, "cache_ptr": _BF16, "slot_mapping_ptr": "*i64", "q_norm_ptr": "*fp32",
                "k_norm_ptr": "*fp32"},
               {"NUM_Q_HEADS": 32, "Q_HEADS_PAD": 32, "NUM_KV_HEADS": 8, "KV_HEADS_PAD": 8, "HALF": 64,
                "HALF_PAD": 64, "WRITE_KV": True, "HEAD_DIM": 128, "DIM_PAD": 128, "BLOCK_SIZE": 16,
                "QK_NORM": False}, {"eps"}),
    "decode_stage1": ("paged_decode_attention", "_decode_stage1",
                      {"q_ptr": _BF16, "cache_ptr": _BF16, "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32",
                       "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32"},
                      {"GROUP": 4, "GROUP_PAD": 16, "HEAD_DIM": 128, "BLOCK_SIZE": 16, "BLOCK_N": 64, "IEEE": False,
                       "DIRECT": False}, {"qk_scale"}),
    "decode_stage2": ("paged_decode_attention", "_decode_stage2",
                      {"part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "out_ptr": _BF16},
                      {"HEAD_DIM": 128, "SPLITS_PAD": 8}, set()),
    "allreduce_norm_lamport": ("allreduce_rmsnorm", "_allreduce_rmsnorm_lamport_kernel",
                               {"x_ptr": _BF16, "residual_ptr": _BF16, "weight_ptr": _BF16, "out_ptr": _BF16,
                                "new_residual_ptr": _BF16, "data_ptrs": "*i64", "counter_ptr": "*i64"},
                               {"WORLD": 2, "WORLD_PAD": 2, "HAS_RESIDUAL": True, "BLOCK": 4096, "BITS": 16, "PROGRAMS": 32,
                                "CLEAR_BLOCK": 1024}, {"eps"}),
    "allreduce_norm_flags": ("allreduce_rmsnorm", "_allreduce_rmsnorm_kernel",
                             {"x_ptr": _BF16, "residual_ptr": _BF16, "weight_ptr": _BF16, "out_ptr": _BF16,
                              "new_residual_ptr": _BF16, "data_ptrs": "*i64", "flag_ptrs": "*i64",
                              "counter_ptr": "*i64"},
                             {"WORLD": 2, "HAS_RESIDUAL": True, "BLOCK": 4096}, {"eps"}),
}


# The kernels the parallel layers call live in parallel/kernels/, the others in workers/kernels/.
PARALLEL_KERNELS = ("allreduce_rmsnorm", "decode_linear", "rmsnorm")


def _ptx(name: str, use_pdl: bool) -> str:
    module, kernel, pointers, constexprs, floats = KERNELS[name]
    package = "parallel" if module in PARALLEL_KERNELS else "workers"
    return compile_ptx(f"shardserve.{package}.kernels.{module}", kernel, pointers=pointers,
                       constexprs={**constexprs, "USE_PDL": use_pdl}, floats=floats)


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_the_wait_comes_before_any_global_access(name):
    on = _ptx(name, True)
    wait = on.find("griddepcontrol.wait")
    release = on.find("griddepcontrol.launch_dependents")
    first_access = re.search(r"\b(?:ld|st|atom|red)\.global", on)
    assert wait >= 0 and release >= 0, "USE_PDL compiled without griddepcontrol"
    assert first_access is not None and wait < first_access.start(), "a global access precedes the wait"
    off = _ptx(name, False)
    assert "griddepcontrol" not in off

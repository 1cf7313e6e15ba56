"""Decode-size linear (workers/kernels/decode_linear.py) vs its torch reference, and its PTX.

Under the interpreter (CI) on small shapes with small tiles: one row (the FMA path) and 2..16
rows (the tensor-core dot), K not a multiple of the chunk, N not a multiple of the tile, bias,
the fused SiLU-and-mul epilogue, bad arguments. Compiled for sm_90 on the CPU: the weights'
first chunk is loaded before the PDL wait and the activations only after it.
"""

from __future__ import annotations

import re

import pytest
import torch
from compiled_ptx import compile_ptx
from kernel_env import DEVICE
from shardserve.workers.kernels import reference
from shardserve.workers.kernels.decode_linear import (
    ENV_DECODE_GEMV,
    GemvTiles,
    decode_linear,
    default_tiles,
    gemv_wanted,
    wanted_for,
)

# bf16 dots are only right compiled (the 3.9 interpreter multiplies bf16 dot operands as raw
# uint16, see kernel_env.py); one row takes no dot, so it is checked in bf16 everywhere.
DOT_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


def _inputs(rows, n, k, dtype, device):
    x = torch.randn(rows, k, device=device).to(dtype)
    w = (torch.randn(n, k, device=device) / k**0.5).to(dtype)
    return x, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("n", "k"), [(20, 64), (37, 100), (8, 33)])  # tails of N and K, K below one chunk
def test_one_row_matches_reference(device, dtype, n, k):
    x, w = _inputs(1, n, k, dtype, device)
    out = decode_linear(x, w)
    assert out.shape == (1, n) and out.dtype == dtype
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out, reference.decode_linear(x, w), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize("rows", [2, 5, 16])
def test_several_rows_match_reference(device, dtype, rows):
    x, w = _inputs(rows, 40, 72, dtype, device)  # 3 programs of 16 features, 3 chunks of 32 columns
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(decode_linear(x, w), reference.decode_linear(x, w), atol=atol, rtol=rtol)


@pytest.mark.parametrize("rows", [1, 3])
def test_bias_is_added_before_the_rounding(device, rows):
    dtype = torch.float16
    x, w = _inputs(rows, 24, 48, dtype, device)
    bias = torch.randn(24, device=device).to(dtype)
    torch.testing.assert_close(decode_linear(x, w, bias), reference.decode_linear(x, w, bias), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("inter", [16, 21])  # 21: the up half starts mid-tile
def test_silu_mul_epilogue_matches_the_unfused_pair(device, rows, inter):
    dtype = torch.float16
    x, w = _inputs(rows, 2 * inter, 64, dtype, device)
    out = decode_linear(x, w, silu_mul=True)
    assert out.shape == (rows, inter)
    torch.testing.assert_close(out, reference.decode_linear(x, w, silu_mul=True), atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(out, reference.silu_and_mul(reference.decode_linear(x, w)), atol=2e-3, rtol=2e-3)


def test_explicit_tiles_and_empty_input(device):
    x, w = _inputs(1, 50, 200, torch.float32, device)
    for tiles in (GemvTiles(4, 16, 4, 1), GemvTiles(16, 64, 4, 1), GemvTiles(8, 256, 4, 1)):
        torch.testing.assert_close(decode_linear(x, w, tiles=tiles), reference.decode_linear(x, w),
                                   atol=1e-4, rtol=1e-4)
    assert decode_linear(x[:0], w).shape == (0, 50)


def test_bad_arguments_are_rejected(device):
    x, w = _inputs(2, 8, 16, torch.float32, device)
    with pytest.raises(ValueError, match="at most 16 rows"):
        decode_linear(torch.randn(17, 16, device=device), w)
    with pytest.raises(ValueError, match="does not match"):
        decode_linear(x, torch.randn(8, 15, device=device))
    with pytest.raises(ValueError, match="even number"):
        decode_linear(x, torch.randn(7, 16, device=device), silu_mul=True)
    with pytest.raises(ValueError, match="bias must have shape"):
        decode_linear(x, w, torch.randn(9, device=device))
    with pytest.raises(ValueError, match="contiguous"):
        decode_linear(x.T, w)
    with pytest.raises(ValueError, match="at least 16 features"):
        decode_linear(x, w, tiles=GemvTiles(8, 16, 4, 1))


def test_which_calls_it_takes(monkeypatch):
    w = torch.randn(8, 16, dtype=torch.bfloat16)
    assert not wanted_for(torch.randn(1, 16, dtype=torch.bfloat16), w)  # CPU tensors: cuBLAS / torch path
    assert gemv_wanted({}) and not gemv_wanted({ENV_DECODE_GEMV: "0"})


def test_default_tiles_give_every_sm_work():
    # TP 4's qkv (1,536 features) at one row: 4 features a program -> 384 programs on 132 SMs.
    assert default_tiles(1, 1536, 4096, 132) == GemvTiles(4, 512, 4, 2)
    assert default_tiles(1, 4096, 1024, 132).block_n == 8  # o_proj: 512 programs, not 256
    assert default_tiles(1, 14336, 4096, 132).block_n == 16
    t = default_tiles(8, 1536, 4096, 132)
    assert t.block_n >= 16 and t.block_k <= 256


def _ptx(one_row: bool, use_pdl: bool) -> str:
    return compile_ptx("shardserve.workers.kernels.decode_linear", "_decode_linear_kernel",
                       pointers={"x_ptr": "*bf16", "w_ptr": "*bf16", "bias_ptr": "*bf16", "out_ptr": "*bf16"},
                       constexprs={"HAS_BIAS": False, "SILU_MUL": False, "ONE_ROW": one_row,
                                   "BLOCK_M": 1 if one_row else 16, "BLOCK_N": 8 if one_row else 16,
                                   "BLOCK_K": 512 if one_row else 256, "USE_PDL": use_pdl},
                       aligned=("x_ptr", "w_ptr", "out_ptr", "K", "stride_xm", "stride_wn"))


def _global_loads(ptx: str) -> list[tuple[int, set[int]]]:
    """(offset in the PTX, which kernel parameters the address derives from) of every ld.global:
    a register is derived from parameter i when an instruction computes it from one that is."""
    derived: dict[str, set[int]] = {}
    loads = []
    offset = 0
    for line in ptx.splitlines(keepends=True):
        param = re.search(r"ld\.param\.[bu]64\s+(%rd\d+),\s*\[\w+_param_(\d+)\]", line)
        regs = re.findall(r"%\w+", line)
        if param:
            derived[param.group(1)] = {int(param.group(2))}
        elif "ld.global" in line:
            address = re.search(r"\[\s*(%\w+)", line)
            loads.append((offset, set(derived.get(address.group(1), set())) if address else set()))
        elif len(regs) > 1:
            sources = set().union(*(derived.get(r, set()) for r in regs[1:]))
            if sources:
                derived[regs[0]] = derived.get(regs[0], set()) | sources
        offset += len(line)
    return loads


X_PARAM, W_PARAM = 0, 1  # positions of x_ptr and w_ptr in the kernel's signature


@pytest.mark.parametrize("one_row", [True, False])
def test_weights_load_before_the_wait_and_activations_after(one_row):
    ptx = _ptx(one_row, True)
    wait = ptx.find("griddepcontrol.wait")
    assert wait >= 0 and "griddepcontrol.launch_dependents" in ptx
    assert not re.search(r"\b(?:st|atom|red)\.global", ptx[:wait])
    loads = _global_loads(ptx)
    before = [params for at, params in loads if at < wait]
    after = [params for at, params in loads if at > wait]
    # the first weight chunk is in flight before the wait ...
    assert before and all(params == {W_PARAM} for params in before), before
    # ... and the activations, which the kernel before this one writes, are only read after it
    assert any(X_PARAM in params for params in after)
    assert "griddepcontrol" not in _ptx(one_row, False)

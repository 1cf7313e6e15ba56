"""Batch-1 projection kernel (parallel/kernels/decode_linear.py) vs its torch reference, and its PTX.

Under the interpreter (CI) on small shapes with small tiles: K not a multiple of the chunk, N not
a multiple of the tile, bias, the fused SiLU-and-mul epilogue, explicit tiles, bad arguments; the
tiles tables. Compiled for sm_90 on the CPU: the weights' first chunk is loaded before the PDL
wait and the activations only after it.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from compiled_ptx import compile_ptx
from shardserve.parallel.kernels import decode_linear as dl
from shardserve.parallel.kernels.decode_linear import GemvTiles, decode_linear
from shardserve.parallel.options import DEFAULT_KERNEL_OPTIONS, KernelOptions, set_kernel_options
from shardserve.workers.kernels import reference

TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


def _inputs(n, k, dtype, device):
    x = torch.randn(1, k, device=device).to(dtype)
    w = (torch.randn(n, k, device=device) / k**0.5).to(dtype)
    return x, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("n", "k"), [(20, 64), (37, 100), (8, 33)])  # tails of N and K, K below one chunk
def test_matches_reference(device, dtype, n, k):
    x, w = _inputs(n, k, dtype, device)
    out = decode_linear(x, w)
    assert out.shape == (1, n) and out.dtype == dtype
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out, reference.decode_linear(x, w), atol=atol, rtol=rtol)


def test_bias_is_added_before_the_rounding(device):
    x, w = _inputs(24, 48, torch.float16, device)
    bias = torch.randn(24, device=device).to(torch.float16)
    torch.testing.assert_close(decode_linear(x, w, bias), reference.decode_linear(x, w, bias), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("inter", [16, 21])  # 21: the up half starts mid-tile
def test_silu_mul_epilogue_matches_the_unfused_pair(device, inter):
    x, w = _inputs(2 * inter, 64, torch.float16, device)
    out = decode_linear(x, w, silu_mul=True)
    assert out.shape == (1, inter)
    torch.testing.assert_close(out, reference.decode_linear(x, w, silu_mul=True), atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(out, reference.silu_and_mul(reference.decode_linear(x, w)), atol=2e-3, rtol=2e-3)


def test_explicit_tiles_and_empty_input(device):
    x, w = _inputs(50, 200, torch.float32, device)
    for tiles in (GemvTiles(2, 16, 4, 1), GemvTiles(16, 64, 4, 1), GemvTiles(8, 256, 4, 1)):
        torch.testing.assert_close(decode_linear(x, w, tiles=tiles), reference.decode_linear(x, w),
                                   atol=1e-4, rtol=1e-4)
    assert decode_linear(x[:0], w).shape == (0, 50)


def test_bad_arguments_are_rejected(device):
    x, w = _inputs(8, 16, torch.float32, device)
    with pytest.raises(ValueError, match="at most 1 row"):
        decode_linear(torch.randn(2, 16, device=device), w)
    with pytest.raises(ValueError, match="does not match"):
        decode_linear(x, torch.randn(8, 15, device=device))
    with pytest.raises(ValueError, match="even number"):
        decode_linear(x, torch.randn(7, 16, device=device), silu_mul=True)
    with pytest.raises(ValueError, match="bias must have shape"):
        decode_linear(x, w, torch.randn(9, device=device))
    with pytest.raises(ValueError, match="contiguous"):
        decode_linear(torch.randn(16, 2, device=device).T[:1], w)


def test_which_calls_it_takes():
    w = torch.randn(8, 16, dtype=torch.bfloat16)
    assert not dl.wanted_for(torch.randn(1, 16, dtype=torch.bfloat16), w)  # CPU tensors: the torch path
    assert dl.gemv_wanted() and not dl.gemv_wanted(KernelOptions(decode_gemv=False))
    set_kernel_options(KernelOptions(decode_gemv=False))  # parallel.decode_gemv: false
    try:
        assert not dl.gemv_wanted()
    finally:
        set_kernel_options(DEFAULT_KERNEL_OPTIONS)
    dl.set_enabled(False)  # what models.layers.set_fused_kernels(False) does
    try:
        assert not dl.gemv_wanted()
    finally:
        dl.set_enabled(True)


def test_default_tiles_give_every_sm_work():
    # TP 4's qkv shard (1,536 features): 384 programs of 4 features; K chunks of 1,024 columns
    assert dl.default_tiles(1536, 4096) == GemvTiles(4, 1024, 4, 3)
    assert dl.default_tiles(4096, 100).block_k == 128


def test_tuned_tables(tmp_path):
    path = tmp_path / "card.json"
    path.write_text(json.dumps({dl.tiles_key(1536, 4096, False): [8, 256, 8, 1]}))
    table = dl.tuned_tiles(str(path))
    assert table == {"1536,4096,0": GemvTiles(8, 256, 8, 1)}
    assert dl.tuned_tiles(str(tmp_path / "missing.json")) == {}
    # the table shipped for the H100 covers the TP 1 / 2 / 4 shard shapes of Llama-3.1-8B
    shipped = dl.table_path("NVIDIA H100 80GB HBM3")
    assert shipped.endswith("gemv_tiles/NVIDIA_H100_80GB_HBM3.json")
    h100 = dl.tuned_tiles(shipped)
    for tp in (1, 2, 4):
        assert dl.tiles_key(6144 // tp, 4096, False) in h100 and dl.tiles_key(14336 // tp, 4096, True) in h100
    assert dl.table_path("NVIDIA H100 80GB HBM3", str(path)) == str(path)  # parallel.gemv_tiles


def _ptx(use_pdl: bool, weight: str = "*bf16") -> str:
    """bf16 weights, or 1-byte codes ("*i8", "*fp8e4nv") with their fp32 row scales (the quantized GEMVs)."""
    return compile_ptx("shardserve.parallel.kernels.decode_linear", "_decode_linear_kernel",
                       pointers={"x_ptr": "*bf16", "w_ptr": weight, "s_ptr": "*fp32", "bias_ptr": "*bf16",
                                 "out_ptr": "*bf16"},
                       constexprs={"HAS_SCALE": weight != "*bf16", "HAS_BIAS": False, "SILU_MUL": False,
                                   "BLOCK_N": 4, "BLOCK_K": 1024, "USE_PDL": use_pdl},
                       aligned=("x_ptr", "w_ptr", "out_ptr", "K", "stride_wn"))


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


@pytest.mark.parametrize("weight", ["*bf16", "*i8", "*fp8e4nv"])
def test_weights_load_before_the_wait_and_activations_after(weight):
    ptx = _ptx(True, weight)
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
    assert "griddepcontrol" not in _ptx(False, weight)

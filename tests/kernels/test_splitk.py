"""Split-K GEMMs (codes_gemm.py INT4 planes, int8_gemm.py INT8 codes, splitk.py) vs torch references.

Under Triton's interpreter (CI; fp16 there, bf16 too with SHARDSERVE_KERNEL_DEVICE=cuda, see
kernel_env.py): INT4 groups 32 / 64 / 128, symmetric and asymmetric, act-order, and INT8, each at
K split 1, 2 and 3 ways where 3 does not divide the K steps (INT4: 5 chunks of 256 columns run as
2 + 2 + 1; INT8: 8 blocks of 128 columns as 3 + 3 + 2, K padded), more splits asked than K steps,
bias, M not a multiple of BLOCK_M (5 and 20 rows with BLOCK_M 16), N a partial tile; against
x @ w.dequantize().T in fp32. INT8 with mins that are not -128 s (the row-sum term of the kernel).
The default-tile heuristic's contract on the Llama-3.1-8B shapes; both kernels compiled for sm_90
(no GPU needed); on CUDA, a CUDA-graph replay.
"""

from __future__ import annotations

import re

import pytest
import torch
from kernel_env import DEVICE
from quant_weights import random_int4
from shardserve.workers.quant.kernels import splitk
from shardserve.workers.quant.kernels.int4 import int4_linear, pack_int4
from shardserve.workers.quant.kernels.int8 import int8_linear, pack_int8
from shardserve.workers.quant.kernels.splitk import SplitTiles
from shardserve.workers.quant.weights import Int8Weight

DTYPES = [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
REL_TOL = {torch.float16: 4e-3, torch.bfloat16: 1.5e-2}  # of max |reference|: scales stored in the dtype
N = 40  # a partial BLOCK_N tile of 16 / 32




def _int8(n, k, device):
    return Int8Weight(torch.randint(-128, 128, (n, k), dtype=torch.int8, device=device),
                      torch.rand(n, device=device) * 0.01 + 1e-3)


def _check(out, x, w, bias):
    ref = x.float() @ w.dequantize().T + bias.float()
    assert out.shape == ref.shape and out.dtype == x.dtype
    err = (out.float() - ref).abs().max().item()
    assert err <= REL_TOL[x.dtype] * ref.abs().max().item(), err


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("group", "symmetric", "split", "rows"), [
    (32, True, 1, 5), (32, False, 3, 5), (64, True, 2, 5), (64, False, 3, 5), (128, True, 3, 20), (128, False, 2, 5),
])
def test_int4_split_k(device, dtype, group, symmetric, split, rows):
    """K = 1280: 5 chunks of 8 planes of 32 columns; act-order on the groups of 64."""
    w = random_int4(N, 1280, group, symmetric, group == 64, device)
    x = torch.randn(rows, 1280, device=device).to(dtype)
    bias = torch.randn(N, device=device).to(dtype)
    _check(int4_linear(x, pack_int4(w, dtype), bias, split_tiles=SplitTiles(16, 32, split, 4, 1)), x, w, bias)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("split", "rows"), [(1, 5), (2, 20), (3, 5), (16, 5)])
def test_int8_split_k(device, dtype, split, rows):
    """K = 1000: 8 K steps of 128 columns, the last partial; 16 splits asked run as 8 of one step; the
    extremes -128 and 127 in the codes."""
    w = _int8(N, 1000, device)
    w.q[0, :100], w.q[1, :100] = -128, 127
    x = torch.randn(rows, 1000, device=device).to(dtype)
    bias = torch.randn(N, device=device).to(dtype)
    _check(int8_linear(x, pack_int8(w, dtype), bias, split_tiles=SplitTiles(16, 16, split, 4, 1)), x, w, bias)


SHAPES_8B = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]


@pytest.mark.parametrize("bits", [4, 8])
def test_default_split_tiles(bits, monkeypatch):
    """The heuristic: splits only where the grid is under two waves, at least MIN_STEPS K steps and at most
    MAX_SPLIT a split; a SPLIT_TABLE entry (the sweep's) wins for its shape and row bucket."""
    monkeypatch.setattr(splitk, "SPLIT_TABLE", {})  # the heuristic alone (the shipped table has these shapes)
    for rows in splitk.SWEEP_ROWS:
        for n, k in SHAPES_8B:
            t = splitk.default_split_tiles(bits, rows, n, k)
            tiles = -(-rows // t.block_m) * -(-n // t.block_n)
            assert t.block_m >= min(rows, 64) or t.block_m == 64
            assert 1 <= t.split_k <= splitk.MAX_SPLIT
            if t.split_k > 1:
                assert tiles * t.split_k <= 2 * splitk.SM_COUNT
                assert splitk.k_steps(bits, k) // t.split_k >= splitk.MIN_STEPS
    assert splitk.default_split_tiles(bits, 64, 4096, 4096).split_k > 1  # o_proj: 64 tiles of 64 x 64
    assert splitk.default_split_tiles(bits, 64, 28672, 4096).split_k == 1  # gate_up: 448 tiles
    forced = SplitTiles(32, 128, 3, 8, 2)
    monkeypatch.setitem(splitk.SPLIT_TABLE, (bits, 32, 4096, 4096), forced)
    assert splitk.default_split_tiles(bits, 17, 4096, 4096) == forced
    assert splitk.default_split_tiles(bits, 33, 4096, 4096) != forced


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs: run with SHARDSERVE_KERNEL_DEVICE=cuda")
def test_split_k_in_a_cuda_graph(device):
    """Captured (partials buffer from the caching allocator, reduce kernel) and replayed on new x."""
    w4, w8 = random_int4(256, 4096, 128, False, False, device), _int8(256, 4096, device)
    p4, p8 = pack_int4(w4, torch.bfloat16), pack_int8(w8, torch.bfloat16)
    x = torch.randn(48, 4096, device=device).bfloat16()
    bias = torch.randn(256, device=device).bfloat16()
    t = SplitTiles(64, 64, 4, 4, 3)
    int4_linear(x, p4, bias, split_tiles=t), int8_linear(x, p8, bias, split_tiles=t)  # compile outside
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y4, y8 = int4_linear(x, p4, bias, split_tiles=t), int8_linear(x, p8, bias, split_tiles=t)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    _check(y4, x, w4, bias)
    _check(y8, x, w8, bias)


_GEMM_POINTERS = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*bf16", "m_ptr": "*bf16", "bias_ptr": "*bf16",
                  "out_ptr": "*fp32"}
_COMPILED = [  # module, kernel, pointers, constexprs
    ("codes_gemm", "_codes_gemm_kernel", _GEMM_POINTERS,
     {"PLANE": 32, "GROUP": 128, "SCALE_EVERY": 4, "BLOCK_M": 64, "BLOCK_N": 64, "HAS_BIAS": False, "SPLIT": True}),
    ("int8_gemm", "_int8_gemm_kernel", {"x_ptr": "*bf16", "w_ptr": "*i8", "s_ptr": "*fp32", "bias_ptr": "*bf16",
                                         "out_ptr": "*fp32"},
     {"BLOCK_K": 128, "BLOCK_M": 64, "BLOCK_N": 64, "HAS_BIAS": False, "SPLIT": True}),
    ("splitk", "_reduce_kernel", {"part_ptr": "*fp32", "bias_ptr": "*bf16", "out_ptr": "*bf16"},
     {"HAS_BIAS": True, "BLOCK": 1024}),
]


def test_split_k_kernels_compile_for_h100():
    """What the interpreter cannot show: each kernel compiles for sm_90 (no GPU needed, one process for
    the three); the GEMMs write fp32 partials from a K loop on tensor cores with pipelined (cp.async)
    loads; with PDL on, each waits for the previous kernel before its first global access
    (parallel/kernels/pdl.py)."""
    from compiled_ptx import compile_ptx_all, ptx_spec

    ptxs = compile_ptx_all([ptx_spec(f"shardserve.workers.quant.kernels.{module}", kernel, pointers=pointers,
                                     constexprs={**constexprs, "USE_PDL": True},
                                     aligned=["N", "K", "KW", "stride_xm", "stride_om", *pointers])
                            for module, kernel, pointers, constexprs in _COMPILED])
    for (module, *_), ptx in zip(_COMPILED, ptxs, strict=True):
        if module != "splitk":
            assert "wgmma" in ptx or "mma.sync" in ptx, module
            assert "cp.async" in ptx, module
        wait = ptx.find("griddepcontrol.wait")
        first_access = re.search(r"\b(?:ld|st|atom|red|cp\.async)\.global", ptx)
        assert 0 <= wait < first_access.start() and "griddepcontrol.launch_dependents" in ptx, module


def test_shipped_table_covers_the_swept_shapes():
    """Every (bits, row bucket, shape) the H100 sweep measured has its tiles, and they are what the engine picks."""
    for bits in (4, 8):
        for rows in splitk.SWEEP_ROWS:
            for n, k in SHAPES_8B:
                assert splitk.default_split_tiles(bits, rows, n, k) == splitk.SPLIT_TABLE[(bits, rows, n, k)]

"""The W4A16 GEMM (workers/quant/kernels/w4a16.py) on INT4 plane-layout weights vs a torch reference.

Under Triton's interpreter (CI; fp16 there, bf16 too with SHARDSERVE_KERNEL_DEVICE=cuda, see kernel_env.py):
groups of 32 / 64 / 96 / 128 / 256 on planes of 16 and 32 columns (a scale load a plane, a group, a chunk),
symmetric and asymmetric, act-order, with and without bias; one plane a dot and several (the reshaped
K-contiguous tile), W as the dot's left operand (swapped) and right; K split 1 and 3 ways; M and N not
multiples of the tiles, K padded to whole chunks; against x @ w.dequantize().T in fp32. The engine's
dispatch (which row counts and layouts take it), the tile table / heuristic contract, the shared-memory
stage cut; the kernel compiled for sm_90 (no GPU needed); on CUDA, a CUDA-graph replay.
"""

from __future__ import annotations

import re

import pytest
import torch
from kernel_env import DEVICE
from quant_weights import random_int4
from shardserve.workers.quant.kernels import codes_gemm as codes_module
from shardserve.workers.quant.kernels import packed as pk
from shardserve.workers.quant.kernels import w4a16
from shardserve.workers.quant.kernels.int4 import int4_linear, pack_int4
from shardserve.workers.quant.kernels.kquant import pack_q4k
from shardserve.workers.quant.kernels.w4a16 import W4Tiles
from shardserve.workers.quant.weights import Int4Weight

DTYPES = [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
REL_TOL = {torch.float16: 4e-3, torch.bfloat16: 1.5e-2}  # of max |reference|: scales stored in the dtype


def _check(out, x, w, bias):
    ref = x.float() @ w.dequantize().T + (0 if bias is None else bias.float())
    assert out.shape == ref.shape and out.dtype == x.dtype
    err = (out.float() - ref).abs().max().item()
    assert err <= REL_TOL[x.dtype] * ref.abs().max().item(), err


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "n", "k", "group", "plane", "symmetric", "bias", "tiles"), [
    (9, 40, 512, 128, 32, False, True, W4Tiles(16, 32, 32, 1, 4, 1)),  # 2 chunks, a scale load per group
    (20, 40, 512, 32, 32, True, False, W4Tiles(16, 32, 32, 2, 4, 1, swap=False)),  # a group a plane, x @ W^T
    (17, 72, 1280, 64, 16, False, True, W4Tiles(32, 32, 32, 3, 4, 1)),  # 10 chunks over 3 splits (4 + 4 + 2)
    (33, 40, 416, 32, 32, False, True, W4Tiles(16, 32, 64, 1, 4, 1)),  # K padded; two planes a dot
    (5, 40, 768, 96, 32, True, True, W4Tiles(16, 16, 128, 2, 4, 1, swap=False)),  # groups of 3 planes, 4 a dot
    (12, 50, 1024, 256, 32, False, False, W4Tiles(16, 32, 32, 1, 4, 1)),  # a scale load a chunk (inside a group)
    (24, 40, 512, 64, 32, False, False, W4Tiles(16, 32, 256, 1, 4, 1)),  # the whole chunk a dot
    (20, 40, 512, 128, 32, False, True, W4Tiles(16, 32, 32, 1, 4, 1, pairs=True)),  # planes d, d + 4 a dot
    (17, 72, 1024, 64, 16, True, False, W4Tiles(32, 32, 32, 3, 4, 1, pairs=True)),  # pairs: groups of 4 planes, split
    (9, 40, 768, 32, 32, False, True, W4Tiles(16, 16, 32, 2, 4, 1, pairs=True)),  # pairs: a group a plane
])
def test_w4a16_matches_dequantized_reference(device, dtype, rows, n, k, group, plane, symmetric, bias, tiles):
    w = random_int4(n, k, group, symmetric, group == 64, device)
    x = torch.randn(rows, k, device=device).to(dtype)
    b = torch.randn(n, device=device).to(dtype) if bias else None
    _check(int4_linear(x, pack_int4(w, dtype, max_plane=plane), b, w4_tiles=tiles), x, w, b)


def test_dispatch_by_rows_and_layout(device, monkeypatch):
    """From w4a16.MIN_ROWS rows INT4 planes with scales in x's dtype take the W4A16 GEMM, below them the
    split-K codes GEMM (the GEMV at one row); GGUF Q4_K's exact float32 planes never take it; forcing it on a
    layout it does not take is an error naming it."""
    calls: list[str] = []
    real_w4, real_codes = w4a16.w4a16_gemm, codes_module.codes_gemm
    monkeypatch.setattr(w4a16, "w4a16_gemm", lambda *a, **kw: calls.append("w4a16") or real_w4(*a, **kw))
    monkeypatch.setattr(pk, "codes_gemm", lambda *a, **kw: calls.append("codes") or real_codes(*a, **kw))
    w = random_int4(40, 512, 128, False, False, device)
    p = pack_int4(w, torch.float16)
    for rows, route in ((1, None), (w4a16.MIN_ROWS - 1, "codes"), (w4a16.MIN_ROWS, "w4a16"), (40, "w4a16")):
        calls.clear()
        x = torch.randn(rows, 512, device=device).half()
        _check(int4_linear(x, p), x, w, None)
        assert calls == ([route] if route else []), rows
    g32 = random_int4(40, 512, 32, False, False, device)
    q4k = Int4Weight(g32.q, g32.scales, g32.mins, 32, float32_scales=True)
    calls.clear()
    x = torch.randn(20, 512, device=device).half()
    _check(int4_linear(x, pack_q4k(q4k)), x, q4k, None)
    assert calls == ["codes"]
    with pytest.raises(ValueError, match="the W4A16 GEMM takes INT4 planes"):
        int4_linear(x, pack_q4k(q4k), w4_tiles=W4Tiles(16, 32, 32, 1, 4, 1))
    with pytest.raises(ValueError, match="block_k must be a power of two"):
        int4_linear(x, p, w4_tiles=W4Tiles(16, 32, 48, 1, 4, 1))


SHAPES_8B = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]


def test_default_tiles_contract(monkeypatch):
    """The heuristic: tiles cover the rows up to 64 (128-row tiles above), splits <= 8 with >= 4 chunks each and
    the grid within two waves where split; a TILE_TABLE entry (the sweep's) wins for its row bucket and shape.
    Stages are cut to what fits in shared memory."""
    monkeypatch.setattr(w4a16, "TILE_TABLE", {})
    for rows in (9, 16, 17, 64, 100, 255, 512, 1024):
        for n, k in SHAPES_8B:
            t = w4a16.default_tiles(rows, n, k)
            assert t.block_m >= min(rows, 128) or t.block_m == 128
            assert 1 <= t.split_k <= 8 and t.block_k == 32 and t.swap
            if t.split_k > 1:
                programs = -(-rows // t.block_m) * -(-n // t.block_n) * t.split_k
                assert programs <= 2 * w4a16.SM_COUNT and (k // 256) // t.split_k >= 4
            assert w4a16.fitting_stages(t, 32) == t.num_stages  # the defaults fit as they are
    assert w4a16.default_tiles(16, 4096, 4096).split_k > 1  # o_proj: 32 tiles of 16 x 128
    forced = W4Tiles(64, 64, 64, 3, 4, 2, swap=False)
    monkeypatch.setitem(w4a16.TILE_TABLE, (64, 4096, 4096), forced)
    assert w4a16.default_tiles(33, 4096, 4096) == forced
    assert w4a16.default_tiles(65, 4096, 4096) != forced
    big = W4Tiles(128, 128, 32, 1, 8, 4)  # 16 KiB of words + 64 KiB of x a stage
    assert w4a16.fitting_stages(big, 32) == w4a16.SMEM_BYTES // (80 * 1024) == 2


def test_dequant_route_follows_the_tile_table(monkeypatch):
    """Below DEQUANT_MIN_ROWS rows never dequantize; from there only where TILE_TABLE lacks the shape's row bucket
    (the sweep writes entries there only where this GEMM beat dequantize + cuBLAS); past the largest bucket
    always. The shipped table's entries from DEQUANT_MIN_ROWS route to w4a16.py."""
    for key in w4a16.TILE_TABLE:
        if key[0] >= w4a16.DEQUANT_MIN_ROWS:
            assert not w4a16.dequant_wins(key[0], key[1], key[2]), key
    won = W4Tiles(128, 128, 32, 1, 8, 2)
    monkeypatch.setattr(w4a16, "TILE_TABLE", {(512, 4096, 4096): won})
    assert not w4a16.dequant_wins(w4a16.DEQUANT_MIN_ROWS - 1, 4096, 4096)
    assert w4a16.dequant_wins(w4a16.DEQUANT_MIN_ROWS, 4096, 4096)  # bucket 256: not in the table
    assert not w4a16.dequant_wins(300, 4096, 4096) and not w4a16.dequant_wins(512, 4096, 4096)
    assert w4a16.default_tiles(300, 4096, 4096) == won
    assert w4a16.dequant_wins(513, 4096, 4096) and w4a16.dequant_wins(300, 6144, 4096)
    assert w4a16.dequant_wins(w4a16.SWEEP_ROWS[-1] + 1, 4096, 4096)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs: run with SHARDSERVE_KERNEL_DEVICE=cuda")
def test_w4a16_in_a_cuda_graph(device):
    """Captured with a K split (partials from the caching allocator, the reduce kernel) and replayed on new x."""
    w = random_int4(256, 4096, 128, False, False, device)
    p = pack_int4(w, torch.bfloat16)
    x = torch.randn(48, 4096, device=device).bfloat16()
    bias = torch.randn(256, device=device).bfloat16()
    t = W4Tiles(64, 64, 32, 4, 4, 3)
    int4_linear(x, p, bias, w4_tiles=t)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = int4_linear(x, p, bias, w4_tiles=t)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    _check(y, x, w, bias)


def test_w4a16_compiles_for_h100():
    """What the interpreter cannot show: compiled for sm_90 (no GPU needed), the swapped one-plane-a-dot kernel
    and the paired one (w4a16_pairs.py, its inline PTX) run wgmma with the dequantized W as a register operand
    (no shared-memory store of W: wgmma's A operand is registers, `{...}`), word and x tiles pipelined by
    cp.async; with PDL on, each waits for the previous kernel before its first global access."""
    from compiled_ptx import compile_ptx_all, ptx_spec

    pointers = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*bf16", "m_ptr": "*bf16", "bias_ptr": "*bf16",
                "out_ptr": "*fp32"}
    aligned = ["N", "K", "KW", "stride_xm", "stride_om", *pointers]
    plain, pairs = compile_ptx_all([
        ptx_spec("shardserve.workers.quant.kernels.w4a16", "_w4a16_kernel", pointers=pointers, aligned=aligned,
                 constexprs={"PLANE": 32, "GROUP": 128, "SUB": 1, "BLOCK_M": 16, "BLOCK_N": 64, "SWAP": True,
                             "EVEN_K": True, "HAS_BIAS": False, "SPLIT": True, "USE_PDL": True}),
        ptx_spec("shardserve.workers.quant.kernels.w4a16_pairs", "_w4a16_pairs_kernel", pointers=pointers,
                 aligned=aligned, constexprs={"PLANE": 32, "GROUP": 128, "BLOCK_M": 64, "BLOCK_N": 64,
                                              "HAS_BIAS": False, "SPLIT": True, "ASM": True, "USE_PDL": True}),
    ])
    for ptx in (plain, pairs):
        wgmma = re.findall(r"wgmma\.mma_async\S*\s+\{[^}]*\},\s*(\S)", ptx)
        assert wgmma and all(a == "{" for a in wgmma), "wgmma's A operand must be registers"
        assert "cp.async" in ptx
        wait = ptx.find("griddepcontrol.wait")
        first_access = re.search(r"\b(?:ld|st|atom|red|cp\.async)\.global", ptx)
        assert 0 <= wait < first_access.start() and "griddepcontrol.launch_dependents" in ptx
    # the paired kernel: two weights an and-or, a packed subtract and a packed FMA; no per-weight fp32 FMA
    assert "fma.rn.bf16x2" in pairs and "sub.rn.bf16x2" in pairs and "fma.rn.f32" not in pairs

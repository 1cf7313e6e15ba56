"""INT4 / INT8 weight-only kernels and FP8 activation quantization (workers/quant/kernels/) vs torch references.

Under Triton's interpreter (CI) on small shapes (K 256, N 96): the matrix-vector kernel (M 1, 3)
and the tl.dot GEMM (M 17; fp16 only under the interpreter, whose tl.dot multiplies bf16 as raw
integers: see kernel_env.py), group sizes 32 / 64 / 128, symmetric and asymmetric mins, act-order
perm, bias, K padded to whole chunks, several K iterations; against x @ w.dequantize().T in fp32.
The layout itself is checked word by word; FP8's row quantization bit for bit against torch's
e4m3 rounding; FP8's decode GEMV and W8A16 split-K GEMM; `fp8_linear`'s W8A8 path (torch._scaled_mm)
only where CUDA exists.
"""

from __future__ import annotations

import pytest
import torch
from quant_weights import random_int4
from shardserve.workers.quant.kernels import int8 as int8_module
from shardserve.workers.quant.kernels import packed as pk
from shardserve.workers.quant.kernels.fp8 import fp8_gemv, fp8_linear, pack_fp8, quantize_rows
from shardserve.workers.quant.kernels.int4 import int4_linear, pack_int4, plane_for
from shardserve.workers.quant.kernels.int8 import int8_linear, pack_int8
from shardserve.workers.quant.kernels.int8_gemm import dequantize_int8
from shardserve.workers.quant.kernels.splitk import SplitTiles
from shardserve.workers.quant.weights import Fp8Weight, Int4Weight, Int8Weight

N, K = 96, 256
REL_TOL = {torch.float16: 4e-3, torch.bfloat16: 1.5e-2}  # of max |reference|: scales stored in the dtype




def _check(out, x, w, bias=None):
    ref = x.float() @ w.dequantize().T + (0 if bias is None else bias.float())
    assert out.shape == ref.shape and out.dtype == x.dtype
    err = (out.float() - ref).abs().max().item()
    assert err <= REL_TOL[x.dtype] * ref.abs().max().item(), err


@pytest.mark.parametrize(("group", "symmetric", "act_order"), [(32, True, False), (64, False, True),
                                                               (128, False, False)])
@pytest.mark.parametrize(("rows", "dtype"), [(1, torch.bfloat16), (3, torch.float16), (17, torch.float16)])
def test_int4_matches_dequantized_reference(device, group, symmetric, act_order, rows, dtype):
    w = random_int4(N, K, group, symmetric, act_order, device)
    x = torch.randn(rows, K, device=device).to(dtype)
    bias = torch.randn(N, device=device).to(dtype) if rows != 3 else None
    _check(int4_linear(x, pack_int4(w, dtype), bias), x, w, bias)


def test_int4_padding_and_several_iterations(device):
    """K = 416 (13 groups of 32): two chunks of 256 columns, the second padded; one chunk an iteration;
    N = 50: a partial tile of rows; GEMM with a partial M tile."""
    w = random_int4(50, 416, 32, False, False, device)
    p = pack_int4(w, torch.float16)
    x = torch.randn(2, 416, device=device).half()
    _check(int4_linear(x, p, gemv_tiles=pk.GemvTiles(16, 1, 4)), x, w)
    x = torch.randn(20, 416, device=device).half()
    _check(int4_linear(x, p, gemm_tiles=pk.GemmTiles(16, 16, 4, 1)), x, w)


@pytest.mark.parametrize(("group", "max_plane"), [(32, 16), (128, 16), (64, 128)])
def test_int4_gemm_one_dot_a_chunk(device, group, max_plane):
    """GEMM with the chunk's planes unpacked side by side (one tl.dot a chunk; the GPU default above 16
    rows), planes narrower than the group (several planes a group) or as wide."""
    w = random_int4(N, K, group, False, True, device)
    p = pack_int4(w, torch.float16, max_plane=max_plane)
    x = torch.randn(18, K, device=device).half()
    bias = torch.randn(N, device=device).half()
    _check(int4_linear(x, p, bias, gemm_tiles=pk.GemmTiles(16, 32, 4, 1, chunk_dot=True)), x, w, bias)
    x1 = x[:1]
    _check(int4_linear(x1, p), x1, w)  # the GEMV with several planes a group (p16) or one (p64)


@pytest.mark.parametrize(("rows", "dtype"), [(1, torch.bfloat16), (3, torch.float16), (17, torch.float16)])
def test_int8_matches_dequantized_reference(device, rows, dtype):
    w = Int8Weight(torch.randint(-128, 128, (N, K), dtype=torch.int8, device=device),
                   torch.rand(N, device=device) * 0.01 + 1e-3)
    x = torch.randn(rows, K, device=device).to(dtype)
    bias = torch.randn(N, device=device).to(dtype)
    _check(int8_linear(x, pack_int8(w, dtype), bias), x, w, bias)


def test_int8_padding(device):
    """K = 200: not a multiple of the kernels' 128-column K steps; the extremes -128 and 127."""
    q = torch.randint(-128, 128, (40, 200), dtype=torch.int8, device=device)
    q[0, :100], q[1, :100] = -128, 127
    w = Int8Weight(q, torch.rand(40, device=device) * 0.01 + 1e-3)
    p = pack_int8(w, torch.float16)
    for rows in (1, 18):
        x = torch.randn(rows, 200, device=device).half()
        _check(int8_linear(x, p), x, w)


def test_plane_layout_word_by_word():
    """Word j of chunk c holds in field i the code of column c * PLANES * PLANE + i * PLANE + j."""
    u = torch.randint(0, 16, (3, 300), dtype=torch.uint8)
    words = pk.pack_planes(u, 4, 16)  # chunks of 128 columns: 3 chunks, the last padded
    assert words.shape == (3, 3 * 16) and words.dtype == torch.int32
    for c, i, j in [(0, 0, 0), (0, 7, 15), (1, 3, 5), (2, 2, 10), (2, 5, 0)]:
        col = c * 128 + i * 16 + j
        field = (int(words[1, c * 16 + j]) >> (4 * i)) & 0xF
        assert field == (int(u[1, col]) if col < 300 else 0)
    u8 = torch.randint(0, 256, (2, 512), dtype=torch.uint8)
    w8 = pk.pack_planes(u8, 8, 128)
    assert all((int(w8[0, j]) >> (8 * i)) & 0xFF == int(u8[0, i * 128 + j]) for i in range(4) for j in (0, 77))


def test_plane_width_follows_the_group_size():
    assert [plane_for(g) for g in (32, 64, 128, 256, 96)] == [32, 64, 128, 128, 32]
    with pytest.raises(ValueError, match="multiple of 16"):
        plane_for(8)


def test_bad_inputs_are_rejected(device):
    w = random_int4(N, K, 64, True, False, device)
    p = pack_int4(w, torch.float16)
    with pytest.raises(ValueError, match="must be \\[M, 256\\]"):
        int4_linear(torch.randn(1, 128, device=device).half(), p)
    with pytest.raises(ValueError, match="packed for torch.float16"):
        int4_linear(torch.randn(1, K, device=device).bfloat16(), p)
    with pytest.raises(ValueError, match="bias must have shape"):
        int4_linear(torch.randn(1, K, device=device).half(), p, torch.zeros(5, device=device).half())
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        pack_int4(w, torch.float32)
    with pytest.raises(ValueError, match="0..15"):
        pack_int4(Int4Weight(w.q + 16, w.scales, w.mins, 64), torch.float16)
    with pytest.raises(ValueError, match="int8 codes"):
        pack_int8(Int8Weight(torch.zeros(4, 8, device=device), torch.ones(4, device=device)), torch.float16)
    assert int4_linear(torch.randn(0, K, device=device).half(), p).shape == (0, N)


def test_fp8_row_quantization_is_torchs_e4m3_rounding(device):
    """Scale = amax / 448 per row; codes equal torch's round-to-nearest-even cast bit for bit, subnormals,
    the saturating max and an all-zero row included; K = 300 over chunks of 128."""
    x = torch.cat([torch.randn(3, 300, device=device) * 3, torch.randn(1, 300, device=device) * 1e-3,
                   torch.zeros(1, 300, device=device)]).to(torch.bfloat16)
    x[0, 5] = 100.0
    q, s = quantize_rows(x, block_k=128)
    ref_s = (x.float().abs().amax(1, keepdim=True) / 448).clamp_min(1e-12)
    ref_q = (x.float() / ref_s).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (5, 1)
    torch.testing.assert_close(s, ref_s, rtol=0, atol=0)
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))
    assert q[0, 5].float().item() == 448.0 and not q[4].float().any()


def test_fp8_pack_rejects_bad_weights():
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        pack_fp8(Fp8Weight(torch.zeros(16, 16), torch.ones(16)))
    with pytest.raises(ValueError, match="multiples of 16"):
        pack_fp8(Fp8Weight(torch.zeros(16, 24).to(torch.float8_e4m3fn), torch.ones(16)))


def test_fp8_decode_gemv_matches_dequantized_reference(device):
    """A decode row: e4m3 weights x unquantized bf16 activations; K = 208 over chunks of 32 (the last partial),
    N = 48 (the SiLU epilogue: test_silu_mul_epilogue_of_the_decode_kernels)."""
    rows = 1
    w = torch.randn(48, 208, device=device) / 208**0.5
    s = w.abs().amax(1) / 448
    fw = Fp8Weight((w / s[:, None]).to(torch.float8_e4m3fn), s)
    x = torch.randn(rows, 208, device=device).bfloat16()
    bias = torch.randn(48, device=device).bfloat16()
    out = fp8_gemv(x, pack_fp8(fw), bias)
    ref = x.float() @ fw.dequantize().T + bias.float()
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 48)
    assert (out.float() - ref).abs().max().item() <= 1e-2 * ref.abs().max().item()


@pytest.mark.parametrize("splits", [1, 2])
def test_fp8_splitk_gemm_keeps_activations_unquantized(device, splits):
    """2 .. SPLITK_MAX_ROWS rows: int8_gemm.py's split-K GEMM on the e4m3 codes (x not quantized), bias,
    K over two steps of 128, partial M / N tiles, one split or two (fp16 under the interpreter)."""
    w = torch.randn(N, K, device=device) / K**0.5
    s = w.abs().amax(1) / 448
    fw = Fp8Weight((w / s[:, None]).to(torch.float8_e4m3fn), s)
    x = torch.randn(5, K, device=device).half()
    bias = torch.randn(N, device=device).half()
    _check(fp8_linear(x, pack_fp8(fw), bias, split_tiles=SplitTiles(16, 64, splits, 4, 1)), x, fw, bias)
    if device.type != "cuda":  # the default route of 5 rows is the same GEMM (interpreter tiles)
        _check(fp8_linear(x, pack_fp8(fw), bias), x, fw, bias)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch._scaled_mm needs CUDA (Hopper FP8)")
@pytest.mark.parametrize("rows", [1, 17])
def test_fp8_linear_on_cuda(rows):
    dev = torch.device("cuda")
    w = torch.randn(N, K, device=dev) / K**0.5
    s = w.abs().amax(1) / 448
    fw = Fp8Weight((w / s[:, None]).to(torch.float8_e4m3fn), s)
    x = torch.randn(rows, K, device=dev).bfloat16()
    bias = torch.randn(N, device=dev).bfloat16()
    out = fp8_linear(x, pack_fp8(fw), bias, gemv_max_rows=0, splitk_max_rows=0)
    q, xs = quantize_rows(x)
    ref = (q.float() * xs) @ fw.dequantize().T + bias.float()
    assert out.dtype == torch.bfloat16 and out.shape == (rows, N)
    assert (out.float() - ref).abs().max().item() <= 1.5e-2 * ref.abs().max().item()


@pytest.mark.parametrize(("group", "max_plane", "symmetric"), [(32, 16, True), (32, 32, False), (64, 32, False),
                                                               (128, 32, True), (128, 16, False), (256, 32, False),
                                                               (128, 128, False)])
def test_int4_codes_gemm(device, group, max_plane, symmetric):
    """codes_gemm.py: the raw codes through tl.dot, group scales on the accumulator, for every way a
    group can sit in a chunk (a plane per group, 2 or 4 planes, the chunk inside a group); act-order,
    bias, partial M and N tiles, K over two chunks (fp16 under the interpreter, see the docstring)."""
    w = random_int4(40, 512, group, symmetric, group == 64, device)
    p = pack_int4(w, torch.float16, max_plane=max_plane)
    x = torch.randn(5, 512, device=device).half()
    bias = torch.randn(40, device=device).half()
    _check(int4_linear(x, p, bias, split_tiles=SplitTiles(16, 16, 1, 4, 1)), x, w, bias)


def test_codes_gemm_dispatch(device):
    """Which GEMM takes more than GEMV_MAX_ROWS rows under the interpreter: INT4 in groups of whole
    planes the split-K GEMM (codes_gemm.py; INT8 codes: int8_gemm.py), INT4 groups of 96 (3 planes) the
    dequantizing GEMM; forcing a split-K GEMM on a layout it does not take is an error naming it."""
    q = torch.randint(-128, 128, (40, 600), dtype=torch.int8, device=device)
    q[0, :100], q[1, :100] = -128, 127
    w = Int8Weight(q, torch.rand(40, device=device) * 0.01 + 1e-3)
    p = pack_int8(w, torch.float16)
    x = torch.randn(18, 600, device=device).half()
    _check(int8_linear(x, p), x, w)
    assert pk.codes_supported(4, 32, 128, False, torch.bfloat16)
    assert not pk.codes_supported(4, 32, 96, False, torch.bfloat16)  # 3 planes a group: old GEMM
    w4 = random_int4(40, 384, 96, False, False, device)
    p4 = pack_int4(w4, torch.float16)
    assert not pk.split_supported(p4.weights, torch.float16)
    _check(int4_linear(x[:, :384], p4), x[:, :384], w4)  # groups of 96: the dequantizing GEMM
    with pytest.raises(ValueError, match="the split-K GEMM takes INT4 in groups of whole planes"):
        int4_linear(x[:, :384], p4, split_tiles=SplitTiles(16, 16, 2, 4, 1))


def test_int8_gemm_table_routes_its_shapes(device, monkeypatch):
    """int8.GEMM_TABLE (the sweep's winners) sends 65 .. 1024 rows of its (row bucket, N, K) to int8_gemm.py with
    its tiles; other row counts and shapes, and a caller's dequant_min_rows, keep the engine's routes (here the
    interpreter's split-K tiles). K 300: a partial K step; 65 rows: a tile past the rows."""
    seen: list[SplitTiles | None] = []
    real = int8_module.gemm_8bit
    monkeypatch.setattr(int8_module, "gemm_8bit", lambda x, c, s, b, t=None: seen.append(t) or real(x, c, s, b, t))
    tiles = SplitTiles(64, 32, 2, 4, 1)
    monkeypatch.setattr(int8_module, "GEMM_TABLE", {(128, 40, 300): tiles, (1024, 40, 300): tiles})
    w = Int8Weight(torch.randint(-128, 128, (40, 300), dtype=torch.int8, device=device),
                   torch.rand(40, device=device) * 0.01 + 1e-3)
    p = pack_int8(w, torch.float16)
    bias = torch.randn(40, device=device).half()
    for rows, expect in ((64, None), (65, tiles)):
        seen.clear()
        x = torch.randn(rows, 300, device=device).half()
        _check(int8_linear(x, p, bias), x, w, bias)
        assert seen == [expect], rows
    seen.clear()
    int8_linear(x[:100], p, dequant_min_rows=1 << 20)
    assert seen == [None]
    assert int8_module.table_tiles(128, 40, 300) == tiles and int8_module.table_tiles(129, 40, 300) is None
    assert int8_module.table_tiles(1024, 40, 300) == tiles and int8_module.table_tiles(1025, 40, 300) is None
    assert int8_module.table_tiles(100, 40, 256) is None


def _silu_mul_ref(y: torch.Tensor) -> torch.Tensor:
    gate, up = y.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate.float()) * up.float()


def test_silu_mul_epilogue_of_the_decode_kernels(device):
    """gate_up at decode size: silu(gate) * up from the GEMV's epilogue for INT4, INT8 and FP8 (W = [gate;
    up]), equal to the unfused projection followed by SiLU-and-mul; through cuda.py's KernelRuntime,
    which declines above the GEMV's rows (and for INT4 on CUDA, which runs torch's kernel unfused)."""
    from shardserve.workers.quant.cuda import cuda_runtime
    from shardserve.workers.quant.kernels.tinygemm import Int4Dual

    x = torch.randn(1, K, device=device).bfloat16()
    w4 = random_int4(N, K, 64, False, False, device)
    w8 = Int8Weight(torch.randint(-128, 128, (N, K), dtype=torch.int8, device=device),
                    torch.rand(N, device=device) * 0.01 + 1e-3)
    wf = torch.randn(N, K, device=device) / K**0.5
    sf = wf.abs().amax(1) / 448
    f8 = Fp8Weight((wf / sf[:, None]).to(torch.float8_e4m3fn), sf)
    for w in (w4, w8, f8):
        runtime = cuda_runtime(w, torch.device(device), torch.bfloat16)
        fused = runtime.silu_mul(x)
        if isinstance(runtime.packed, Int4Dual):
            assert fused is None and torch.device(device).type == "cuda"
            continue
        ref = _silu_mul_ref(runtime(x, None))
        assert fused.shape == (1, N // 2) and fused.dtype == torch.bfloat16
        assert (fused.float() - ref).abs().max().item() <= 1e-2 * ref.abs().max().item(), type(w).__name__
        assert runtime.silu_mul(torch.randn(17, K, device=device).bfloat16()) is None
    with pytest.raises(ValueError, match="silu_mul takes at most"):
        int4_linear(x, pack_int4(w4, torch.bfloat16), torch.zeros(N, device=device).bfloat16(), silu_mul=True)


@pytest.mark.parametrize(("bits", "group"), [(4, 32), (4, 128), (8, 0)])
def test_dequantize_planes_for_prefill(device, bits, group):
    """From DEQUANT_MIN_ROWS rows on CUDA, W is dequantized (INT4 planes, INT8 codes) to the activation dtype
    and cuBLAS multiplies: the dequantized W equals the weight's own dequantize() (K: 416 / 384 / 600)."""
    if bits == 4:
        w = random_int4(48, 416 if group == 32 else 384, group, False, True, device)
        p = pack_int4(w, torch.float16).weights
        ref = w.dequantize()[:, w.perm]  # act-order: the packed codes are in permuted column order
    else:
        w = Int8Weight(torch.randint(-128, 128, (48, 600), dtype=torch.int8, device=device),
                       torch.rand(48, device=device) * 0.01 + 1e-3)
        p = pack_int8(w, torch.float16)
        ref = w.dequantize()
    got = pk.dequantize_planes(p, torch.float16) if bits == 4 else dequantize_int8(p.codes, p.scales, torch.float16)
    assert got.shape == ref.shape and got.dtype == torch.float16
    assert (got.float() - ref.float()).abs().max().item() <= 2e-3 * ref.abs().max().item()

"""The quantized CPU kernels (workers/quant/cpu_kernels) against w.dequantize() + F.linear.

With float activations (the default) results must equal the reference to float rounding; with
int8 activations (llama.cpp's way) they move by the activation rounding, so those are compared
with a tolerance relative to the output's scale, far below a wrong nibble order, scale index or
min term (each of which moves the output by whole quantization steps).
Every instruction-set variant this CPU supports is checked, the scalar one included.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from shardserve.workers.quant import cpu_kernels
from shardserve.workers.quant.cpu_kernels import PackedQ8, best_isa, pack_q4, pack_q8, q4_linear, q8_linear
from shardserve.workers.quant.cpu_kernels.kquant import kquant_linear, pack_q4f, pack_q8g16
from shardserve.workers.quant.weights import GroupedWeight, Int8Weight

ISAS = ["scalar", "avx2", "avx512vnni"]


def _isas() -> list[str]:
    return ISAS[: ISAS.index(best_isa()) + 1]


def _grouped(n: int, k: int, group: int, bits: int = 4, seed: int = 0) -> GroupedWeight:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8)
    # float16-representable, as GGUF's are: pack_q4 stores them as float16
    scales = (torch.rand(n, k // group, generator=g) * 0.02 + 0.001).half().float()
    mins = (-(torch.rand(n, k // group, generator=g) * 2**bits) * scales).half().float()
    return GroupedWeight(q=q, scales=scales, mins=mins, group_size=group, bits=bits)


def _close(y: torch.Tensor, ref: torch.Tensor, int8: bool = True) -> None:
    err = (y - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= (0.02 if int8 else 2e-5) * scale, f"max error {err:.4g} vs output scale {scale:.4g}"


MODES = [False, True]  # int8_activations


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("m", [1, 3, 15, 17])  # from DENSE_FROM_ROWS = 16 rows on, the dense path
def test_q4_matches_dequantized(group: int, m: int) -> None:
    w = _grouped(40, 256, group, seed=group + m)
    x = torch.randn(m, 256)
    bias = torch.randn(40)
    packed = pack_q4(w)
    ref = F.linear(x, w.dequantize(), bias)
    for isa in _isas():
        for int8 in MODES:
            _close(q4_linear(x, packed, bias, isa=isa, int8_activations=int8), ref, int8)
    _close(q4_linear(x, packed), F.linear(x, w.dequantize()), int8=False)


def test_q4_variants_agree_exactly_up_to_float_order() -> None:
    w, x = _grouped(64, 576, 32, seed=5), torch.randn(2, 576)
    packed = pack_q4(w)
    outs = [q4_linear(x, packed, isa=isa, int8_activations=True) for isa in _isas()]
    for y in outs[1:]:
        torch.testing.assert_close(y, outs[0], rtol=1e-4, atol=1e-4)


def test_q4_nibble_order_matters() -> None:
    # a single non-zero weight at column 17 must be read from the high nibble of byte 1
    q = torch.zeros(16, 64, dtype=torch.uint8)
    q[3, 17] = 15
    w = GroupedWeight(q=q, scales=torch.ones(16, 2), mins=torch.zeros(16, 2), group_size=32)
    x = torch.zeros(1, 64)
    x[0, 17] = 2.0
    y = q4_linear(x, pack_q4(w))
    expected = torch.zeros(1, 16)
    expected[0, 3] = 30.0
    torch.testing.assert_close(y, expected)


def test_q4_act_order_is_the_callers_permutation() -> None:
    w = _grouped(32, 128, 32, seed=9)
    w.perm = torch.randperm(128, generator=torch.Generator().manual_seed(1))
    x = torch.randn(3, 128)
    y = q4_linear(x[:, w.perm], pack_q4(w))
    _close(y, F.linear(x, w.dequantize()), int8=False)


def test_q4_leading_dims_and_dtype() -> None:
    w = _grouped(32, 64, 32)
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    y = q4_linear(x, pack_q4(w))
    assert y.shape == (2, 3, 32) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y, F.linear(x.float(), w.dequantize()).to(torch.bfloat16))


@pytest.mark.parametrize("block", [1 << 22, 40 * 256 // 3])  # one block; 13 rows a block (4 blocks, the last short)
def test_dense_prefill_path_equals_dequantized_weights_blockwise(monkeypatch, block: int) -> None:
    """From DENSE_FROM_ROWS rows with float activations, W is dequantized block by block of rows into the
    thread's scratch and each block is one GEMM: the same numbers as W.dequantize() + F.linear, with bias,
    for Q4 (grouped, mins), Q8 (per channel, and grouped with mins) and the GGUF k-quant forms."""
    monkeypatch.setattr(cpu_kernels, "DENSE_BLOCK", block)
    x, bias = torch.randn(33, 256), torch.randn(40)
    w4 = _grouped(40, 256, 64, seed=3)
    torch.testing.assert_close(q4_linear(x, pack_q4(w4), bias), F.linear(x, pack_q4(w4).dequantize(), bias),
                               rtol=1e-5, atol=1e-5)
    w8 = _grouped(40, 256, 32, bits=8, seed=4)
    p8 = pack_q8(w8)
    y = q8_linear(x, p8, bias)
    assert y.is_contiguous() and y.shape == (33, 40)
    torch.testing.assert_close(y, F.linear(x, p8.dequantize(), bias), rtol=1e-5, atol=1e-5)
    w8c = Int8Weight(q=torch.randint(-128, 128, (40, 256), dtype=torch.int8), scales=torch.rand(40) * 0.01 + 1e-3)
    torch.testing.assert_close(q8_linear(x, pack_q8(w8c)), F.linear(x, w8c.dequantize()), rtol=1e-5, atol=1e-5)
    # GGUF k-quant forms (kquant.py): Q4_K's float32 scale / min, Q6_K's int8 codes with a scale per 16
    q4k = pack_q4f(_grouped(40, 256, 32, seed=5))
    torch.testing.assert_close(kquant_linear(x, q4k, bias), F.linear(x, q4k.dequantize(), bias), rtol=1e-5, atol=1e-5)
    scales6 = torch.rand(40, 16) * 0.01 + 1e-3
    q6k = pack_q8g16(GroupedWeight(q=torch.randint(0, 64, (40, 256), dtype=torch.uint8), scales=scales6,
                                   mins=-32 * scales6, group_size=16, bits=6))
    torch.testing.assert_close(kquant_linear(x, q6k), F.linear(x, q6k.dequantize()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m", [1, 3, 15, 17])
def test_q8_per_channel_matches_dequantized(m: int) -> None:
    g = torch.Generator().manual_seed(m)
    w = Int8Weight(q=torch.randint(-128, 128, (48, 192), generator=g, dtype=torch.int8),
                   scales=torch.rand(48, generator=g) * 0.01 + 1e-3)
    x, bias = torch.randn(m, 192), torch.randn(48)
    packed = pack_q8(w)
    for isa in _isas():
        for int8 in MODES:
            _close(q8_linear(x, packed, bias, isa=isa, int8_activations=int8), F.linear(x, w.dequantize(), bias), int8)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_q8_grouped_with_mins_matches_dequantized(group: int) -> None:
    w = _grouped(24, 256, group, bits=8, seed=group)
    x = torch.randn(5, 256)
    packed = pack_q8(w)
    assert packed.mins is not None
    for isa in _isas():
        for int8 in MODES:
            _close(q8_linear(x, packed, isa=isa, int8_activations=int8), F.linear(x, w.dequantize()), int8)


def test_q8_blocks_like_gguf_q8_0_and_embedding_rows() -> None:
    g = torch.Generator().manual_seed(3)
    q = torch.randint(-127, 128, (100, 96), generator=g, dtype=torch.int8)
    d = torch.rand(100, 3, generator=g) * 0.01
    packed = PackedQ8.from_blocks(q, d)
    dense = (q.float().view(100, 3, 32) * d[:, :, None]).view(100, 96)
    x = torch.randn(1, 96)
    for isa in _isas():
        for int8 in MODES:
            _close(q8_linear(x, packed, isa=isa, int8_activations=int8), F.linear(x, dense), int8)
    ids = torch.tensor([5, 0, 99, 5])
    torch.testing.assert_close(packed.dequantize_rows(ids), dense[ids])


def test_partial_last_group_and_bad_widths_are_refused() -> None:
    q = torch.zeros(16, 80, dtype=torch.uint8)
    partial = GroupedWeight(q=q, scales=torch.ones(16, 3), mins=torch.zeros(16, 3), group_size=32)
    with pytest.raises(ValueError, match="no partial last group"):
        pack_q4(partial)
    with pytest.raises(ValueError, match="group_size a multiple of 32"):
        pack_q4(GroupedWeight(q=torch.zeros(16, 64, dtype=torch.uint8), scales=torch.ones(16, 4),
                              mins=torch.zeros(16, 4), group_size=16))
    with pytest.raises(ValueError, match="4-bit"):
        pack_q4(_grouped(16, 64, 32, bits=8))
    with pytest.raises(TypeError, match="bits=4"):
        pack_q8(_grouped(16, 64, 32))
    with pytest.raises(ValueError, match="input features"):
        q4_linear(torch.randn(1, 32), pack_q4(_grouped(16, 64, 32)))


def test_cpu_runtime_takes_the_kernels_and_falls_back_where_they_cannot() -> None:
    from shardserve.workers.quant.cpu import CpuInt4, cpu_runtime
    from shardserve.workers.quant.cpu_kernels.runtime import Q4Runtime

    w = _grouped(32, 128, 64, seed=4)
    w.perm = torch.randperm(128, generator=torch.Generator().manual_seed(2))
    runtime = cpu_runtime(w)
    assert isinstance(runtime, Q4Runtime)
    x, bias = torch.randn(2, 128), torch.randn(32)
    _close(runtime(x, bias), F.linear(x, w.dequantize(), bias), int8=False)
    group16 = GroupedWeight(q=torch.zeros(16, 64, dtype=torch.uint8), scales=torch.ones(16, 4),
                            mins=torch.zeros(16, 4), group_size=16)
    assert isinstance(cpu_runtime(group16), CpuInt4)  # the kernels' groups are multiples of 32


@pytest.mark.parametrize("m", [1, 3, 17])  # 17: the dense prefill path over the padded weight
@pytest.mark.parametrize("act_order", [False, True])
def test_partial_last_group_is_padded_for_the_kernels(m: int, act_order: bool) -> None:
    """GPTQ g128 on K = 576 (SmolLM2): 4.5 groups. The kernels get whole groups of zero codes and x zero
    columns; the result is the dequantized weight's, and torch's int4 kernel (far slower at 512 rows)
    is not used."""
    from shardserve.workers.quant.cpu import cpu_runtime
    from shardserve.workers.quant.cpu_kernels.runtime import Q4Runtime, Q8Runtime

    full = _grouped(32, 640, 128, seed=5)
    w = GroupedWeight(q=full.q[:, :576].contiguous(), scales=full.scales, mins=full.mins, group_size=128)
    if act_order:
        w.perm = torch.randperm(576, generator=torch.Generator().manual_seed(3))
    runtime = cpu_runtime(w)
    assert isinstance(runtime, Q4Runtime) and runtime.pad == 64
    x, bias = torch.randn(m, 576), torch.randn(32)
    _close(runtime(x, bias), F.linear(x, w.dequantize(), bias), int8=False)
    channel = Int8Weight(q=torch.randint(-127, 128, (16, 200), dtype=torch.int8), scales=torch.rand(16) * 0.01)
    runtime = cpu_runtime(channel)
    assert isinstance(runtime, Q8Runtime) and runtime.pad == 24
    x = torch.randn(m, 200)
    _close(runtime(x, None), F.linear(x, channel.dequantize()), int8=False)


def test_a_failed_build_raises_a_clear_error(tmp_path, monkeypatch) -> None:
    from shardserve.workers.quant.cpu_kernels.build import CpuKernelsUnavailable, build

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    source = tmp_path / "broken.cpp"
    source.write_text("#error this kernel does not compile\n")
    with pytest.raises(CpuKernelsUnavailable, match="broken.cpp"):
        build(source, "shardserve_quant_cpu_broken")


def test_packed_dequantize_is_exact() -> None:
    w = _grouped(16, 256, 64, seed=7)
    torch.testing.assert_close(pack_q4(w).dequantize(), w.dequantize(), rtol=0, atol=0)
    w8 = Int8Weight(q=torch.randint(-128, 128, (8, 64), dtype=torch.int8), scales=torch.rand(8))
    torch.testing.assert_close(pack_q8(w8).dequantize(), w8.dequantize(), rtol=0, atol=0)

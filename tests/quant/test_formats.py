"""Checkpoint layouts: bit-exact packing conventions, round trips, and the errors at detection.

The packing words are checked against values worked out by hand from the public formats
(GPTQ: eight 4-bit values along the input dim, low bits first, zeros stored minus one; AWQ:
eight along the output dim in the order 0 2 4 6 1 3 5 7), so a layout that only round-trips
with itself cannot pass.
"""

from __future__ import annotations

import pytest
import torch
from shardserve.workers.config import ModelConfig
from shardserve.workers.quant.algorithms.rtn import rtn_fp8, rtn_grouped, rtn_int8
from shardserve.workers.quant.formats.awq import AwqLayout
from shardserve.workers.quant.formats.compressed import CompressedLayout
from shardserve.workers.quant.formats.detect import quantization_config, resolve_layout
from shardserve.workers.quant.formats.gptq import GptqLayout
from shardserve.workers.quant.weights import GroupedWeight, narrow_inputs


def _counting_weight() -> GroupedWeight:
    """N = 8 outputs, K = 8 inputs, q[n, k] = k (GPTQ packs along k) ... or n (AWQ along n)."""
    q = torch.arange(8, dtype=torch.uint8).repeat(8, 1)  # q[n, k] = k
    return GroupedWeight(q=q, scales=torch.ones(8, 1), mins=torch.full((8, 1), -8.0), group_size=8)


def test_gptq_words_match_the_public_layout() -> None:
    packed = GptqLayout(4, 8).pack(_counting_weight())
    assert packed["qweight"].shape == (1, 8)
    assert int(packed["qweight"][0, 0]) == 0x76543210  # k = 0..7 in nibbles 0..7
    assert int(packed["qzeros"][0, 0]) == 0x77777777  # zero point 8 stored as 7 (v1)
    assert torch.equal(packed["g_idx"], torch.zeros(8, dtype=torch.int32))


def test_awq_words_match_the_public_layout() -> None:
    w = _counting_weight()
    w = GroupedWeight(q=w.q.t().contiguous(), scales=w.scales, mins=w.mins, group_size=8)  # q[n, k] = n
    packed = AwqLayout(4, 8).pack(w)
    assert packed["qweight"].shape == (8, 1)
    assert int(packed["qweight"][0, 0]) == 0x75316420  # outputs 0 2 4 6 1 3 5 7 in nibbles 0..7
    assert int(packed["qzeros"][0, 0]) & 0xFFFFFFFF == 0x88888888  # int32 words are signed


@pytest.mark.parametrize("layout, bits, sym, act_order", [
    (GptqLayout(4, 32), 4, True, False), (GptqLayout(4, 64), 4, False, False),
    (GptqLayout(4, 128, v2=True), 4, False, False), (GptqLayout(8, 32), 8, False, False),
    (GptqLayout(4, 32, desc_act=True), 4, True, True), (AwqLayout(4, 64), 4, False, False)])
def test_grouped_round_trip(layout, bits: int, sym: bool, act_order: bool) -> None:
    w = torch.randn(48, 320)  # 320 = 2.5 groups of 128: a partial last group
    qw = rtn_grouped(w, layout.group_size, bits=bits, sym=sym)
    if act_order:
        perm = torch.randperm(320, generator=torch.Generator().manual_seed(0))
        qw = rtn_grouped(w[:, perm], layout.group_size, bits=bits, sym=sym)
        qw.perm = perm
    packed = layout.pack(qw)
    specs = layout.tensors(320, 48)
    assert {k: tuple(v.shape) for k, v in packed.items()} == {k: s.shape for k, s in specs.items()}
    back = layout.unpack(packed)
    assert torch.allclose(back.dequantize(), qw.dequantize(), atol=2e-3 * w.abs().max())
    assert (back.dequantize() - w).abs().max() <= (qw.scales.max() * 0.51 + 1e-3)


def test_compressed_round_trip_and_rtn_error_bounds() -> None:
    w = torch.randn(32, 64)
    for kind, qw in (("int8", rtn_int8(w)), ("fp8", rtn_fp8(w))):
        layout = CompressedLayout(kind)
        back = layout.unpack({k: v.reshape(layout.tensors(64, 32)[k].shape) for k, v in layout.pack(qw).items()})
        assert torch.equal(back.dequantize(), qw.dequantize())
        limit = 0.5 / 127 if kind == "int8" else 1 / 16  # half a step / e4m3's 3 mantissa bits
        assert ((qw.dequantize() - w).abs() / w.abs().amax(dim=1, keepdim=True)).max() <= limit + 1e-6


def test_narrow_inputs_keeps_whole_groups() -> None:
    qw = rtn_grouped(torch.randn(16, 128), 32)
    half = narrow_inputs(qw, 64, 64)
    assert torch.equal(half.dequantize(), qw.dequantize()[:, 64:])
    with pytest.raises(ValueError, match="whole groups"):
        narrow_inputs(qw, 48, 64)


def test_resolve_layout_names_both_sides_of_a_contradiction() -> None:
    gptq = quantization_config(4, 128, True, False, "gptq")
    assert isinstance(resolve_layout(None, gptq, torch.float32), GptqLayout)
    assert isinstance(resolve_layout("int4", gptq, torch.float32), GptqLayout)
    with pytest.raises(ValueError, match="quantization: awq contradicts.*gptq"):
        resolve_layout("awq", gptq, torch.float32)
    with pytest.raises(ValueError, match="quantization: int8 contradicts"):
        resolve_layout("int8", gptq, torch.float32)
    with pytest.raises(ValueError, match="needs a gptq checkpoint"):
        resolve_layout("gptq", None, torch.float32)
    assert resolve_layout(None, None, torch.float32) is None
    with pytest.raises(ValueError, match="group_size must be 32, 64, 128 or -1, got 48"):
        resolve_layout(None, {**gptq, "group_size": 48}, torch.float32)
    with pytest.raises(ValueError, match="GPTQ bits must be 4 or 8, got 3"):
        resolve_layout(None, {**gptq, "bits": 3}, torch.float32)
    with pytest.raises(ValueError, match="'marlin24' is not supported"):
        resolve_layout(None, {"quant_method": "marlin24"}, torch.float32)
    with pytest.raises(ValueError, match="quantization must be null or one of"):
        ModelConfig(quantization="int3")
    w8a8 = {"quant_method": "compressed-tensors", "format": "int-quantized", "config_groups": {"g": {
        "weights": {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True},
        "input_activations": {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}}}}
    with pytest.raises(ValueError, match="INT8 weights with quantized activations \\(W8A8\\) are not supported"):
        resolve_layout(None, w8a8, torch.float32)

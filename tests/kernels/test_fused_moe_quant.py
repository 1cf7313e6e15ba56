"""Quantized experts in the fused MoE (workers/quant/kernels/moe.py) against the dequantized torch reference.

Under Triton's interpreter (CI; `SHARDSERVE_KERNEL_DEVICE=cuda` runs the same compiled): INT4 with
groups of 32 / 64 / 128, symmetric and asymmetric, 8-bit groups (GPTQ / compressed-tensors checkpoints),
INT8 per channel and FP8 (W8A16) experts, rounded
from random float experts by the at-load quantizer (algorithms/rtn.py); all experts local, an EP
subset and a middle slice; the direct (batch-1 decode) and aligned GEMM paths; K not a multiple of a
32-column chunk (planes of 16); fp16 and fp32 activations (the interpreter's tl.dot multiplies bf16
as raw integers: kernel_env.py). The reference is `fused_moe_reference` on the dequantized experts in
fp32, so only the activation dtype's rounding separates them. Also: act-order experts (a per-expert input
gather), the stacked layout word by word, and bad inputs (mixed kinds, mismatched shapes, a dtype the
experts were not packed for).
"""

from __future__ import annotations

import pytest
import torch
from shardserve.workers.quant.algorithms.rtn import rtn_fp8, rtn_grouped, rtn_int8
from shardserve.workers.quant.kernels import moe as qmoe
from shardserve.workers.quant.kernels.packed import pack_planes
from shardserve.workers.quant.weights import GroupedWeight

HIDDEN, INTER = 128, 64
TOL = {torch.float16: 4e-3, torch.float32: 1e-4}  # of max |reference|


def _quantize(w: torch.Tensor, method: str, group: int = 32, sym: bool = True):
    if method in ("int4", "int8g"):  # int8g: GPTQ / compressed-tensors 8-bit groups
        return [rtn_grouped(e, group, bits=4 if method == "int4" else 8, sym=sym) for e in w]
    return [rtn_int8(e) if method == "int8" else rtn_fp8(e) for e in w]


def _experts(num_local: int, method: str, device, group: int = 32, sym: bool = True, hidden: int = HIDDEN,
             inter: int = INTER):
    w13 = torch.randn(num_local, 2 * inter, hidden, device=device) * 0.2
    w2 = torch.randn(num_local, hidden, inter, device=device) * 0.2
    return _quantize(w13, method, group, sym), _quantize(w2, method, group, sym)


def _routing(num_tokens: int, num_experts: int, top_k: int, device):
    ids = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(num_tokens)]).to(device)
    return ids, torch.rand(num_tokens, top_k, device=device)


def _check(out: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, tol: float | None = None) -> None:
    assert out.dtype == dtype and out.shape == want.shape
    err = (out.float() - want.float()).abs().max().item()
    assert err <= (tol or TOL[dtype]) * want.float().abs().max().item(), err


@pytest.mark.parametrize(("method", "group", "sym"), [("int4", 32, True), ("int4", 64, False),
                                                      ("int4", 128, False), ("int8", 0, True), ("fp8", 0, True),
                                                      ("int8g", 32, False)])
@pytest.mark.parametrize(("num_tokens", "local", "direct"), [(1, "all", None), (7, "ep_upper_half", False),
                                                             (3, "ep_middle", True)])
def test_quantized_fused_moe_matches_dequantized_reference(device, method, group, sym, num_tokens, local, direct):
    num_experts, top_k = 8, 2
    start, num_local = {"all": (0, 8), "ep_upper_half": (4, 4), "ep_middle": (1, 2)}[local]
    w13, w2 = _experts(num_local, method, device, group, sym, inter=INTER if group <= 64 else 128)
    x = torch.randn(num_tokens, HIDDEN, device=device).half()
    ids, weights = _routing(num_tokens, num_experts, top_k, device)
    dtype = torch.float16
    out = qmoe.fused_moe_quant(x, qmoe.pack_moe(w13, dtype), qmoe.pack_moe(w2, dtype), weights.half(), ids, start,
                               direct=direct)
    _check(out, qmoe.fused_moe_quant_reference(x, w13, w2, weights, ids, start), dtype)


@pytest.mark.parametrize("method", ["int4", "int8", "fp8"])
def test_fp32_activations_and_partial_chunks(device, method):
    """hidden 80 / inter 48: K is no whole number of 32-column chunks (16-column planes, padded chunk)."""
    w13, w2 = _experts(3, method, device, group=16, hidden=80, inter=48)
    x = torch.randn(5, 80, device=device)
    ids, weights = _routing(5, 3, 2, device)
    packed13, packed2 = qmoe.pack_moe(w13, torch.float32), qmoe.pack_moe(w2, torch.float32)
    if method != "fp8":
        assert packed13.plane == 16 and packed2.plane == 16
    out = qmoe.fused_moe_quant(x, packed13, packed2, weights, ids)
    _check(out, qmoe.fused_moe_quant_reference(x, w13, w2, weights, ids), torch.float32)


@pytest.mark.parametrize("bits", [4, 8])
def test_act_order_experts_gather_their_inputs(device, bits):
    """GPTQ act-order experts (columns sorted by group, `perm` per expert; one without): x gathered per column."""
    w13, w2 = _experts(3, "int4" if bits == 4 else "int8g", device, group=32)
    for e in (0, 2):
        perm = torch.randperm(HIDDEN, generator=torch.Generator().manual_seed(e)).to(device)
        w13[e] = GroupedWeight(w13[e].q, w13[e].scales, w13[e].mins, 32, perm=perm, bits=bits)
    packed13 = qmoe.pack_moe(w13, torch.float16)
    assert packed13.perm is not None and torch.equal(packed13.perm[1].long(), torch.arange(HIDDEN, device=device))
    x = torch.randn(6, HIDDEN, device=device).half()
    ids, weights = _routing(6, 3, 2, device)
    out = qmoe.fused_moe_quant(x, packed13, qmoe.pack_moe(w2, torch.float16), weights.half(), ids)
    _check(out, qmoe.fused_moe_quant_reference(x, w13, w2, weights, ids), torch.float16)


def test_stacked_layout_is_each_experts_plane_layout(device):
    w13, _ = _experts(3, "int4", device, group=64, hidden=256)  # K = one 256-column chunk of 32-column planes
    packed = qmoe.pack_moe(w13, torch.float16)
    assert packed.words.shape == (3, 2 * INTER, 256 // 8) and packed.plane == 32
    for e, w in enumerate(w13):
        assert torch.equal(packed.words[e], pack_planes(w.q, 4, 32))
        assert torch.equal(packed.scales[e, : w.scales.shape[1]], w.scales.t().half())
        assert torch.equal(packed.mins[e, : w.mins.shape[1]], w.mins.t().half())


def test_bad_inputs_are_refused(device):
    w13, w2 = _experts(2, "int4", device)
    i8, _ = _experts(2, "int8", device)
    with pytest.raises(ValueError, match="same quantized kind"):
        qmoe.pack_moe([w13[0], i8[1]], torch.float16)
    with pytest.raises(ValueError, match="multiple of 16"):
        qmoe.moe_plane(4, 24, 96)
    p13, p2 = qmoe.pack_moe(w13, torch.float16), qmoe.pack_moe(w2, torch.float16)
    ids, weights = _routing(1, 2, 1, device)
    with pytest.raises(ValueError, match="do not match"):
        qmoe.fused_moe_quant(torch.randn(1, HIDDEN, device=device).half(), p13, p13, weights.half(), ids)
    with pytest.raises(ValueError, match="packed for torch.float16"):
        qmoe.fused_moe_quant(torch.randn(1, HIDDEN, device=device), p13, p2, weights, ids)


@pytest.mark.parametrize("method", ["int4", "int8", "fp8"])
def test_experts_layer_on_device(device, method):
    """FusedExperts quantized at load on `device`: on CUDA the fused kernel path (packed at
    finish_loading), on CPU the per-expert runtimes; an EP-like routing to experts it lacks included."""
    from shardserve.workers.models.moe import FusedExperts
    from shardserve.workers.quant.experts import ExpertQuantMethod
    from shardserve.workers.quant.formats.at_load import AtLoadLayout

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        experts = FusedExperts(num_experts=4, hidden_size=HIDDEN, intermediate_size=INTER, dtype=dtype)
    layout = AtLoadLayout(method, dtype, 32, sym=False)
    experts.quantize_at_load(ExpertQuantMethod(layout))
    w13 = torch.randn(4, 2 * INTER, HIDDEN, device=device) * 0.2
    w2 = torch.randn(4, HIDDEN, INTER, device=device) * 0.2
    with torch.no_grad():
        experts.w13_weight.weight_loader(experts.w13_weight, w13.to(dtype), (None, "gate_up"))
        experts.w2_weight.weight_loader(experts.w2_weight, w2.to(dtype), (None, "down"))
        experts.quant_method.finish_loading(experts)
    assert (experts.quant_method.packed is not None) == (device.type == "cuda")
    x = torch.randn(6, HIDDEN, device=device).to(dtype)
    ids, weights = _routing(6, 4, 2, device)
    with torch.no_grad():
        out = experts(x, ids, weights.to(dtype))
    q13 = [layout.unpack({"weight": w}) for w in w13.to(dtype)]
    q2 = [layout.unpack({"weight": w}) for w in w2.to(dtype)]
    # The CPU kernels keep INT4 scales in fp16 (cpu_kernels/): ~1e-3 of |y|.
    _check(out, qmoe.fused_moe_quant_reference(x, q13, q2, weights, ids), dtype,
           None if device.type == "cuda" else 2e-3)


def test_cuda_tiles_fit_shared_memory_for_every_kind():
    """The bf16 bands would stage 8 activation tiles a chunk for INT4 (over an H100's shared memory at
    the largest bands): stages are lowered, block_m (the alignment's) is kept."""
    from shardserve.workers.kernels.fused_moe import CUDA_TILE_BANDS, SMEM_BUDGET_BYTES

    kinds = [qmoe.pack_moe(_quantize(torch.randn(1, 64, 256), method, 128)[:1], torch.bfloat16)
             for method in ("int4", "int8", "fp8")]
    assert [w.plane for w in kinds] == [32, 32, 0]
    lowered = 0
    for _, tiles in CUDA_TILE_BANDS:
        for w in kinds:
            fitted = qmoe.fit_stages(tiles, w, 2)
            assert fitted.block_m == tiles.block_m and fitted.num_stages >= 1
            assert fitted.num_stages == 1 or qmoe.stage_bytes(fitted, w, 2) * fitted.num_stages <= SMEM_BUDGET_BYTES
            lowered += fitted.num_stages < tiles.num_stages
    assert lowered > 0


@pytest.mark.parametrize(("bits", "perm"), [(4, False), (0, False), (4, True)])
def test_compiles_for_h100_with_tensor_core_dots(bits, perm):
    """The interpreter cannot compile: the INT4 (also with act-order's input gather) and FP8 GEMMs are compiled
    for sm_90 (no GPU needed) at the largest bf16 band, aligned rows; their dequantized tiles reach tensor-core MMAs."""
    from compiled_ptx import compile_ptx

    pointers = {"a_ptr": "*bf16", "w_ptr": "*i32" if bits else "*fp8e4nv", "s_ptr": "*bf16" if bits else "*fp32",
                "m_ptr": "*bf16" if bits else "*fp32", "c_ptr": "*bf16", "row_weight_ptr": "*bf16",
                "sorted_ids_ptr": "*i32", "expert_ids_ptr": "*i32", "num_post_ptr": "*i32", "perm_ptr": "*i32"}
    constexprs = {"BITS": bits, "PLANES": 8 if bits else 1, "PLANE": 32, "GROUP": 128, "MUL_ROW_WEIGHT": True,
                  "PERM": perm,
                  "DIRECT": False, "IEEE": False, "BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 16}
    ptx = compile_ptx("shardserve.workers.quant.kernels.moe", "_moe_qgemm_kernel", pointers=pointers,
                      constexprs=constexprs, num_warps=8)
    assert "wgmma" in ptx or "mma.sync" in ptx

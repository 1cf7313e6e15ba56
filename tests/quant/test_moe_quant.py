"""MoE experts quantized at load (workers/quant/experts.py) on the CPU path, against the dequantized reference.

A tiny Qwen3-MoE checkpoint (6 experts, top-2, hidden 64, experts' intermediate 32) is loaded with
`quantization: int8 | int4 (g32, g64) | fp8`: its experts must be held quantized (float parameters
gone) and the sparse block's output must match `fused_moe_reference` on the same experts rounded by
the same RTN and dequantized, much closer than to the float experts; a whole forward through the
engine runs. The experts layer alone also checks asymmetric INT4 and per-expert checkpoint tensors
loaded through its weight loader. Bad input: GGUF experts (no packed reader), an int4 group
that cannot split the experts' features over TP ranks. The Triton kernel itself is tested in
tests/kernels/test_fused_moe_quant.py (interpreter), EP 2 / TP 2 in tests/parallel/test_moe_quant_parallel.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from shardserve.workers.config import ModelConfig
from shardserve.workers.kernels.moe_reference import fused_moe_reference, moe_route_reference
from shardserve.workers.models.loader import load_model
from shardserve.workers.models.moe import FusedExperts
from shardserve.workers.quant.experts import ExpertQuantMethod, check_expert_layout
from shardserve.workers.quant.formats.at_load import AtLoadLayout
from shardserve.workers.quant.formats.gguf import GgufLayout
from shardserve.workers.quant.formats.gptq import GptqLayout
from shardserve.workers.quant.kernels.moe import fused_moe_quant_reference
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

HIDDEN = 64


def tiny_moe_config() -> Qwen3MoeConfig:
    return Qwen3MoeConfig(hidden_size=HIDDEN, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          max_position_embeddings=512, vocab_size=256, num_hidden_layers=2, intermediate_size=128,
                          moe_intermediate_size=32, num_experts=6, num_experts_per_tok=2, norm_topk_prob=True,
                          decoder_sparse_step=1, mlp_only_layers=[1], tie_word_embeddings=False,
                          bos_token_id=None, eos_token_id=None, pad_token_id=None,
                          architectures=["Qwen3MoeForCausalLM"])


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("qwen3_moe")
    model = AutoModelForCausalLM.from_config(tiny_moe_config(), dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(path)
    return path


def _load(folder: Path, quantization: str | None, group: int = 128):
    config = ModelConfig(model=str(folder), dtype="float32", device="cpu", quantization=quantization,
                         quantization_group_size=group)
    return load_model(config, torch.device("cpu"), torch.float32).model


@pytest.fixture(scope="module")
def float_model(folder: Path):
    return _load(folder, None)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize(("method", "group"), [("int8", 128), ("int4", 32), ("int4", 64), ("fp8", 128)])
def test_experts_quantized_at_load_match_dequantized_reference(folder, float_model, method, group):
    model = _load(folder, method, group)
    experts = model.model.layers[0].mlp.experts
    float_experts = float_model.model.layers[0].mlp.experts
    assert isinstance(experts.quant_method, ExpertQuantMethod)
    assert not [name for name, _ in experts.named_parameters()]  # the float experts are gone
    layout = AtLoadLayout(method, torch.float32, group)
    w13 = [layout.unpack({"weight": w}) for w in float_experts.w13_weight]
    w2 = [layout.unpack({"weight": w}) for w in float_experts.w2_weight]
    x = torch.randn(9, HIDDEN)
    weights, ids = moe_route_reference(torch.randn(9, 6), 2, True)
    with torch.no_grad():
        got = experts(x, ids, weights)
    want = fused_moe_quant_reference(x, w13, w2, weights, ids)
    unquantized = fused_moe_reference(x, float_experts.w13_weight, float_experts.w2_weight, weights, ids)
    # CPU kernels keep scales in fp16 (cpu_kernels/): ~1e-3 of |y| at most; the rounding itself moves far more.
    assert _rel_err(got, want) < 2e-3
    assert _rel_err(got, unquantized) > 5 * _rel_err(got, want)


def test_quantized_moe_model_runs_in_the_engine(folder):
    """Prefill and decode through the engine with INT4 experts and layers; its scores stay near the float model's."""
    from shardserve.workers.llm import LLM
    from shardserve.workers.request import SamplingParams

    prompt = [5, 9, 17, 3, 100, 42]
    scores = {}
    for quantization in (None, "int4"):
        llm = LLM(str(folder), dtype="float32", device="cpu", quantization=quantization, quantization_group_size=32,
                  num_blocks=32, block_size=4)
        try:
            out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
            scores[quantization] = llm.score(prompt)
        finally:
            llm.engine.shutdown()
        assert len(out.outputs[0].token_ids) == 4
    diff = (scores["int4"] - scores[None]).abs().max().item()
    assert 0 < diff < 0.5, diff


@pytest.mark.parametrize("sym", [True, False])
def test_experts_layer_int4_per_expert_tensors(sym):
    """Per-expert gate / up / down tensors through the weight loader, then asymmetric or symmetric INT4 g32."""
    experts = FusedExperts(num_experts=4, hidden_size=HIDDEN, intermediate_size=32, dtype=torch.float32)
    layout = AtLoadLayout("int4", torch.float32, 32, sym=sym)
    experts.quantize_at_load(ExpertQuantMethod(layout))
    gate, up, down = torch.randn(4, 32, HIDDEN) * 0.1, torch.randn(4, 32, HIDDEN) * 0.1, torch.randn(4, HIDDEN, 32) * 0.1
    with torch.no_grad():
        for e in range(4):
            experts.w13_weight.weight_loader(experts.w13_weight, gate[e], (e, "gate"))
            experts.w13_weight.weight_loader(experts.w13_weight, up[e], (e, "up"))
            experts.w2_weight.weight_loader(experts.w2_weight, down[e], (e, "down"))
        experts.quant_method.finish_loading(experts)
    w13 = [layout.unpack({"weight": w}) for w in torch.cat([gate, up], dim=1)]
    w2 = [layout.unpack({"weight": w}) for w in down]
    assert all(bool((w.mins != -8 * w.scales).any()) != sym for w in w13)  # asymmetric: zero points move
    x = torch.randn(5, HIDDEN)
    weights, ids = moe_route_reference(torch.randn(5, 4), 2, False)
    with torch.no_grad():
        got = experts(x, ids, weights)
    assert _rel_err(got, fused_moe_quant_reference(x, w13, w2, weights, ids)) < 2e-3


def test_gguf_experts_are_refused_and_gptq_needs_a_gptq_folder(folder):
    """GGUF experts have no packed reader (GPTQ / AWQ / compressed-tensors do: test_moe_checkpoints.py)."""
    assert isinstance(check_expert_layout(GptqLayout(4, 128)), GptqLayout)
    with pytest.raises(ValueError, match=r"\(gguf Q4_1\) of mixture-of-experts.*int8 \| int4 \| fp8"):
        check_expert_layout(GgufLayout(4, "Q4_1"))
    with pytest.raises(ValueError, match="needs a gptq checkpoint"):
        _load(folder, "gptq")


def test_int4_group_that_cannot_split_experts_over_tp_is_refused():
    method = ExpertQuantMethod(AtLoadLayout("int4", torch.float32, 32))
    with pytest.raises(ValueError, match=r"quantization_group_size 32 .*\(16 a rank is not a multiple of 32\)"):
        method.full_w2_inputs(tp_rank=1, tp_size=2, inter_per_rank=16)
    assert method.full_w2_inputs(tp_rank=1, tp_size=2, inter_per_rank=64)
    assert method.w2_input_slice == (64, 64)
    assert not ExpertQuantMethod(AtLoadLayout("int8", torch.float32)).full_w2_inputs(0, 1, 64)


def test_row_wide_int4_group_splits_over_tp_like_one_process():
    """int4 with quantization_group_size -1 (one scale and min a row): each TP rank's half of w2 keeps the
    whole row's scale and min, so its dequantized weights are exactly one process's, sliced."""
    layout = AtLoadLayout("int4", torch.float32, -1, sym=False)
    w13, w2 = torch.randn(2, 32, HIDDEN), torch.randn(2, HIDDEN, 32)
    _, whole = ExpertQuantMethod(layout).quantize(w13, w2)
    for rank in (0, 1):
        method = ExpertQuantMethod(layout)
        assert method.full_w2_inputs(tp_rank=rank, tp_size=2, inter_per_rank=16)
        _, halves = method.quantize(w13[:, 16 * rank:16 * rank + 16], w2)
        for half, full in zip(halves, whole, strict=True):
            assert half.q.shape == (HIDDEN, 16) and half.group_size == 16
            assert torch.equal(half.dequantize(), full.dequantize()[:, 16 * rank:16 * rank + 16])

"""GPTQ and AWQ on small random layers and a tiny random Llama: GPTQ's output error below RTN's,
act-order permutations, AWQ's folding leaving the float model's function unchanged, and the
calibration pipeline writing back exactly the weights it packs."""

from __future__ import annotations

import copy

import pytest
import torch
from shardserve.workers.quant.algorithms.awq import (
    LLAMA_GROUPS,
    activation_scale,
    fake_quantize,
    search_scales,
)
from shardserve.workers.quant.algorithms.gptq import Hessian, gptq_quantize
from shardserve.workers.quant.algorithms.rtn import rtn_grouped
from shardserve.workers.quant.calibrate import LINEARS, QuantSpec, apply_awq_scales, quantize_model
from shardserve.workers.quant.formats.gptq import GptqLayout
from transformers import LlamaConfig, LlamaForCausalLM


def correlated_inputs(tokens: int, k: int, seed: int = 0) -> torch.Tensor:
    """x [tokens, K] with correlated channels of very different magnitudes, as in real activations."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=gen) / k**0.5 + torch.eye(k)
    magnitudes = torch.rand(k, generator=gen) * 3 + 0.1
    return torch.randn(tokens, k, generator=gen) @ mix * magnitudes


def output_error(x: torch.Tensor, w: torch.Tensor, wq: torch.Tensor) -> float:
    reference = x @ w.T
    return float((reference - x @ wq.T).norm() / reference.norm())


@pytest.mark.parametrize(("bits", "group_size", "sym", "desc_act"), [
    (4, 128, True, False), (4, 128, True, True), (4, 32, False, False), (4, 64, False, True), (8, 128, False, False),
])
def test_gptq_output_error_is_below_rtn(bits, group_size, sym, desc_act):
    n, k = 96, 256
    x = correlated_inputs(1024, k)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(1)) * 0.05
    hessian = Hessian(k)
    for batch in x.split(300):  # the running mean over batches equals one pass
        hessian.add(batch)
    torch.testing.assert_close(hessian.matrix, 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-3)
    q = gptq_quantize(w, hessian.matrix, bits, group_size, sym, desc_act)
    assert q.bits == bits and q.q.dtype == torch.uint8 and int(q.q.max()) <= 2**bits - 1
    gptq_error = output_error(x, w, q.dequantize())
    rtn_error = output_error(x, w, rtn_grouped(w, group_size, bits, sym).dequantize())
    assert gptq_error < 0.9 * rtn_error, (gptq_error, rtn_error)


def test_act_order_perm_sorts_by_hessian_diagonal_and_round_trips_through_gptq_layout():
    n, k, g = 64, 256, 64
    x = correlated_inputs(512, k, seed=3)
    w = torch.randn(n, k) * 0.05
    hessian = Hessian(k)
    hessian.add(x)
    q = gptq_quantize(w, hessian.matrix, 4, g, sym=False, desc_act=True)
    assert q.perm is not None and q.perm.dtype == torch.int64
    assert torch.equal(torch.sort(q.perm).values, torch.arange(k))  # a permutation
    diag = torch.diag(hessian.matrix)[q.perm]
    assert bool((diag[:-1] >= diag[1:]).all())  # columns in decreasing diag(H)
    # y = x[:, perm] @ q.T: the stored column order computes the same as the dequantized weight
    stored = q.q.float() * q.scales.repeat_interleave(g, 1) + q.mins.repeat_interleave(g, 1)
    torch.testing.assert_close(x[:, q.perm] @ stored.T, x @ q.dequantize().T, rtol=1e-4, atol=1e-4)
    layout = GptqLayout(4, g, desc_act=True)
    packed = layout.pack(q)
    assert not torch.equal(packed["g_idx"], torch.arange(k, dtype=torch.int32) // g)
    assert torch.equal(layout.unpack(packed).dequantize(), q.dequantize())


def test_gptq_partial_last_group_and_refusals():
    w = torch.randn(32, 576) * 0.05
    hessian = Hessian(576)
    hessian.add(correlated_inputs(700, 576))
    q = gptq_quantize(w, hessian.matrix, 4, 128)
    assert q.scales.shape == (32, 5)  # 4 full groups of 128 and one of 64
    with pytest.raises(ValueError, match="group_size must be one of"):
        gptq_quantize(w, hessian.matrix, 4, 100)
    with pytest.raises(ValueError, match="bits must be one of"):
        gptq_quantize(w, hessian.matrix, 3, 128)
    with pytest.raises(ValueError, match="hessian has shape"):
        gptq_quantize(w, hessian.matrix[:10, :10], 4, 128)
    with pytest.raises(ValueError, match="desc_act"):
        QuantSpec("awq", desc_act=True)
    with pytest.raises(ValueError, match="bits must be one of"):
        QuantSpec("awq", bits=8)


def tiny_llama(num_kv_heads: int, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=num_kv_heads, max_position_embeddings=128)
    model = LlamaForCausalLM(config).to(dtype).eval()
    with torch.no_grad():  # non-trivial norms, so folding into them is exercised
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight"):
                param.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("num_kv_heads", [4, 2])  # 4: v -> o folds too; 2 (GQA): v -> o is skipped
def test_awq_folding_leaves_the_float_model_unchanged(num_kv_heads):
    model = tiny_llama(num_kv_heads, torch.float64)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    folded = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(5)
    num_folded = 0
    for layer in folded.model.layers:
        for group in LLAMA_GROUPS:
            prev = layer.get_submodule(group.prev)
            linears = [layer.get_submodule(name) for name in group.linears]
            if isinstance(prev, torch.nn.Linear) and prev.out_features != linears[0].in_features:
                continue
            scales = torch.rand(linears[0].in_features, generator=gen, dtype=torch.float64) * 4 + 0.25
            apply_awq_scales(prev, linears, scales)
            num_folded += 1
    assert num_folded == (8 if num_kv_heads == 4 else 6)
    assert not torch.equal(folded.model.layers[0].input_layernorm.weight, model.model.layers[0].input_layernorm.weight)
    with torch.no_grad():
        after = folded(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-12, atol=1e-12)  # identity up to float64 rounding


def test_awq_search_protects_salient_channels():
    n, k, g = 64, 256, 64
    x = correlated_inputs(512, k, seed=7)
    x[:, :4] *= 30  # a few salient input channels, as AWQ observes in LLM activations
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(8)) * 0.05
    search = search_scales(activation_scale(x), [w], lambda ws: x @ ws[0].T, g, 4, sym=False)
    assert search.alpha > 0 and search.loss < 0.8 * search.rtn_loss
    s = search.scales
    awq_error = output_error(x / s, w * s, fake_quantize(w * s, g, 4, False))
    rtn_error = output_error(x, w, fake_quantize(w, g, 4, False))
    assert awq_error < 0.9 * rtn_error


@pytest.mark.parametrize("spec", [QuantSpec("gptq", 4, 32, True, True), QuantSpec("awq", 4, 32, False),
                                  QuantSpec("rtn", 8, 64, False), QuantSpec("gptq", 4, 32, False, True, gptaq=True),
                                  QuantSpec("gptq", 4, 32, False, True, gptaq=True, refit=True, gains=True,
                                            awq_scales=True),
                                  QuantSpec("awq", 4, 32, False, True, static_groups=True, rounding="gptq",
                                            gptaq=True, refit=True, gains=True),
                                  QuantSpec("rtn", 4, 32, False, refit=True)],
                         ids=lambda s: f"{s.method}{s.bits}{'-gptaq' if s.gptaq else ''}{'-refit' if s.refit else ''}"
                                       f"{'-' + s.rounding if s.rounding else ''}{'-awq_scales' if s.awq_scales else ''}")
def test_quantize_model_writes_back_exactly_what_it_packs(spec):
    model = tiny_llama(4)
    ids = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(ids).logits
    result = quantize_model(model, ids, spec, progress=False)
    assert sorted(result.packed) == sorted(f"model.layers.{i}.{name}" for i in range(2) for name in LINEARS)
    for name, weight in result.weights.items():
        assert torch.equal(model.get_submodule(name).weight, weight.dequantize())
        assert torch.equal(spec.layout.unpack(result.packed[name]).dequantize(), weight.dequantize())
    with torch.no_grad():
        error = float((model(ids).logits - reference).norm() / reference.norm())
    assert 0 < error < (0.02 if spec.bits == 8 else 0.3)
    if spec.awq_scaling:
        assert len(result.awq_alphas) == 8


def test_gptq_model_error_is_below_rtn_on_a_tiny_llama():
    ids = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(2))
    errors = {}
    for method in ("rtn", "gptq"):
        model = tiny_llama(2)
        with torch.no_grad():
            reference = model(ids).logits
        quantize_model(model, ids, QuantSpec(method, 4, 32, sym=True), progress=False)
        with torch.no_grad():
            errors[method] = float((model(ids).logits - reference).norm() / reference.norm())
    assert errors["gptq"] < errors["rtn"], errors


def test_gptaq_targets_the_float_models_output():
    """Inputs drifted by earlier quantized layers (x) vs the float model's (x~): the asymmetric
    Hessian's feedback brings Q x closer to W x~ than plain GPTQ, more so with a larger alpha."""
    k = 256
    x_float = correlated_inputs(2048, k)
    x = x_float + 0.3 * torch.randn(2048, k, generator=torch.Generator().manual_seed(3))
    w = torch.randn(64, k, generator=torch.Generator().manual_seed(4))
    errors = []
    for asymmetric, alpha in ((False, 0.0), (True, 0.25), (True, 1.0)):
        hessian = Hessian(k, asymmetric=asymmetric)
        hessian.add(x, x_float if asymmetric else None)
        q = gptq_quantize(w, hessian.matrix, 4, 128, sym=False, desc_act=True, dxxt=hessian.dxxt,
                          dxxt_alpha=alpha).dequantize()
        errors.append(float((x @ q.T - x_float @ w.T).square().mean()))
    assert errors[2] < errors[1] < errors[0], errors
    with pytest.raises(ValueError, match="needs the float model's inputs"):
        Hessian(k, asymmetric=True).add(x)
    with pytest.raises(ValueError, match=r"gptaq_alpha must be in \(0, 1\], got 0"):
        QuantSpec("gptq", gptaq=True, gptaq_alpha=0)


def test_awq_refuses_groups_that_do_not_divide_a_linear():
    """SmolLM2's 576 input features at group 128: AWQ's layout (no g_idx) cannot hold it, so it is refused
    up front, naming the linear; GPTQ (g_idx) and dividing groups pass."""
    from shardserve.workers.quant.calibrate import QuantSpec, check_whole_groups
    from torch import nn

    layers = nn.ModuleList([nn.ModuleDict({"mlp": nn.ModuleDict({"up_proj": nn.Linear(576, 64)})})])
    with pytest.raises(ValueError, match=r"awq group_size 128 does not divide model\.layers\.0\.mlp\.up_proj's 576"):
        check_whole_groups(layers, QuantSpec("awq", 4, 128, False))
    check_whole_groups(layers, QuantSpec("awq", 4, 64, False))
    check_whole_groups(layers, QuantSpec("gptq", 4, 128, False))

"""Scale refit (algorithms/refit.py) and channel gains (gains.py): with the codes and integer zeros kept, the least-squares scales lower
the output error of GPTQ's and of clipped RTN's weights, also against GPTAQ's float target, and a
weight with act-order columns keeps its perm."""

from __future__ import annotations

import pytest
import torch
from shardserve.workers.quant.algorithms.clip import OUTPUT_MSE, clipped_grouped
from shardserve.workers.quant.algorithms.gains import channel_gains
from shardserve.workers.quant.algorithms.gptq import Hessian, gptq_quantize
from shardserve.workers.quant.algorithms.refit import refit_scales
from shardserve.workers.quant.calibrate import QuantSpec


def inputs(tokens: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=gen) / k**0.5 + torch.eye(k)
    return torch.randn(tokens, k, generator=gen) @ mix * (torch.rand(k, generator=gen) * 3 + 0.1)


@pytest.mark.parametrize("method", ["gptq", "gptq-act-order", "clipped-rtn"])
def test_refit_lowers_the_output_error_and_keeps_codes(method):
    n, k = 64, 320  # a partial last group of 64
    x = inputs(1024, k, seed=0)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(1)) * 0.05
    hessian = Hessian(k)
    hessian.add(x)
    if method == "clipped-rtn":
        q = clipped_grouped(w, 128, 4, False, OUTPUT_MSE, hessian.matrix)
    else:
        q = gptq_quantize(w, hessian.matrix, 4, 128, sym=False, desc_act=method == "gptq-act-order")
    refit = refit_scales(q, w, hessian.matrix)
    assert torch.equal(refit.q, q.q) and (refit.perm is None) == (q.perm is None)
    zeros = -q.mins / q.scales
    torch.testing.assert_close(-refit.mins / refit.scales, zeros, atol=1e-3, rtol=0)  # same integer zeros
    assert torch.equal(refit.scales, refit.scales.half().float())  # fp16 as the checkpoint stores them

    def error(weight) -> float:
        return float((x @ (w - weight.dequantize()).T).square().mean())

    assert error(refit) < 0.99 * error(q), (error(refit), error(q))


def test_refit_with_the_float_target_of_gptaq():
    k = 256
    x_float = inputs(2048, k, seed=2)
    x = x_float + 0.3 * torch.randn(2048, k, generator=torch.Generator().manual_seed(3))
    w = torch.randn(48, k, generator=torch.Generator().manual_seed(4))
    hessian = Hessian(k, asymmetric=True)
    hessian.add(x, x_float)
    q = gptq_quantize(w, hessian.matrix, 4, 128, sym=False, dxxt=hessian.dxxt, dxxt_alpha=1.0)
    plain = refit_scales(q, w, hessian.matrix)
    target = refit_scales(q, w, hessian.matrix, hessian.matrix + hessian.dxxt)

    def error(weight) -> float:  # the quantized stream's output against the float model's
        return float((x @ weight.dequantize().T - x_float @ w.T).square().mean())

    assert error(target) < error(plain) and error(target) < error(q), (error(target), error(plain), error(q))


def test_channel_gains_undo_a_shared_shrink():
    """A quantized weight whose input channels are all off by their own factor: the gains recover 1 / factor."""
    k = 128
    x = inputs(1024, k, seed=5)
    w = torch.randn(96, k, generator=torch.Generator().manual_seed(6))
    hessian = Hessian(k)
    hessian.add(x)
    factor = 1 + 0.2 * torch.rand(k, generator=torch.Generator().manual_seed(7))
    gains = channel_gains(w * factor, w, hessian.matrix)
    torch.testing.assert_close(gains, 1 / factor, rtol=1e-3, atol=1e-3)
    noisy = w * factor + 0.05 * torch.randn(96, k, generator=torch.Generator().manual_seed(8))
    gains = channel_gains(noisy, w, hessian.matrix)
    assert float((x @ (noisy * gains - w).T).square().mean()) < float((x @ (noisy - w).T).square().mean())


def test_spec_refuses_options_without_their_rounding():
    with pytest.raises(ValueError, match="gains .* follow GPTQ rounding; method is awq"):
        QuantSpec("awq", gains=True)
    with pytest.raises(ValueError, match="refit needs the clipping search"):
        QuantSpec("rtn", clip=False, refit=True)
    with pytest.raises(ValueError, match="awq_scales .* is a GPTQ option; method is rtn"):
        QuantSpec("rtn", awq_scales=True)
    with pytest.raises(ValueError, match="AWQ layout has no g_idx"):
        QuantSpec("awq", rounding="gptq", desc_act=True)
    with pytest.raises(ValueError, match="rounding must be one of"):
        QuantSpec("awq", rounding="nearest")
    assert QuantSpec("awq", rounding="gptq", desc_act=True, static_groups=True).layout.group_size == 128

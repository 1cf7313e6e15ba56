"""Scale refit (algorithms/refit.py): with the codes and integer zeros kept, the least-squares scales lower
the output error of GPTQ's and of clipped RTN's weights, also against GPTAQ's float target, and a
weight with act-order columns keeps its perm."""

from __future__ import annotations

import pytest
import torch
from shardserve.workers.quant.algorithms.clip import OUTPUT_MSE, clipped_grouped
from shardserve.workers.quant.algorithms.gptq import Hessian, gptq_quantize
from shardserve.workers.quant.algorithms.refit import refit_scales


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

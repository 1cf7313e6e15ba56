"""AWQ (Lin et al., 2023): per-input-channel scales that protect salient weights, folded into the op before.

Data flow for one group of linears that read the same input x [tokens, K] (Llama: q/k/v after
input_layernorm, gate/up after post_attention_layernorm, o after v and down after up when the
shapes allow — `LLAMA_GROUPS`, the scheme of llm-awq's `auto_scale_block`):
  1. `activation_scale(x)`: mean |x| per input channel [K];
  2. `search_scales`: for alpha in 0, 1/20, ..., 19/20, s = mean|x|^alpha (normalised so that
     max(s) * min(s) = 1); each weight becomes RTN(W * s) / s (rtn.py's grid); the `inspect`
     callable runs the module the group feeds (attention, MLP, or the linear itself) with those
     weights; the alpha whose output is closest (mean squared error) to the float output wins;
  3. the caller folds 1/s into the op that produces x (`fold_into_norm` for an RMSNorm weight,
     `fold_into_linear` for the previous linear's output rows) and multiplies the group's
     weights by s (`scale_inputs`) — the float model computes the same function as before —
     then RTN-quantizes the scaled weights (`quantize_scaled`).
With `duo` (AutoAWQ's default), s = mean|x|^alpha / w_mean^(1 - alpha), where w_mean is each
input's mean weight magnitude relative to its group's largest. The weight clipping of llm-awq's
`auto_clip` follows the scaling, in clip.py (the caller runs it on the scaled weights).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from shardserve.workers.quant.algorithms.gptq import one_thread
from shardserve.workers.quant.algorithms.rtn import group_grid, quantize_to_grid, rtn_grouped
from shardserve.workers.quant.weights import GroupedWeight

NUM_GRID = 20


@dataclass(frozen=True)
class AwqGroup:
    """Linears (names relative to a decoder layer) that share the input produced by `prev`, and the
    module whose output the scale search compares (`inspect`)."""

    prev: str
    linears: tuple[str, ...]
    inspect: str


LLAMA_GROUPS = (
    AwqGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    AwqGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),  # only if v and o have one shape
    AwqGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    AwqGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
)


@dataclass(frozen=True)
class ScaleSearch:
    """scales: float32 [K]; alpha: the exponent chosen; loss: its output MSE; rtn_loss: the MSE of
    alpha = 0 (s = 1, plain RTN), so loss <= rtn_loss by construction."""

    scales: torch.Tensor
    alpha: float
    loss: float
    rtn_loss: float


def activation_scale(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] -> mean |x| per input channel, float32 [K]."""
    return x.detach().abs().reshape(-1, x.shape[-1]).float().mean(dim=0)


def weight_scale(weights: Sequence[torch.Tensor], group_size: int) -> torch.Tensor:
    """Mean over the group's output rows of |w| / max |w| of its quantization group, per input [K]
    (AutoAWQ's w_mean: how large each input's weights are on their grids)."""
    w = torch.cat([w.float() for w in weights], dim=0).abs()  # [sum N_i, K]
    g = w.shape[1] if group_size == -1 else group_size
    normalised = torch.cat([part / (part.amax(dim=1, keepdim=True) + 1e-6) for part in w.split(g, dim=1)], dim=1)
    return normalised.mean(dim=0)


def scales_for(x_mean: torch.Tensor, alpha: float, w_mean: torch.Tensor | None = None) -> torch.Tensor:
    """s = mean|x|^alpha, or with w_mean (AutoAWQ's duo scaling) mean|x|^alpha / w_mean^(1 - alpha)."""
    s = x_mean.pow(alpha)
    if w_mean is not None:
        s = s / (w_mean.pow(1 - alpha) + 1e-4)
    s = s.clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def search_scales(x_mean: torch.Tensor, weights: Sequence[torch.Tensor],
                  inspect: Callable[[list[torch.Tensor]], torch.Tensor],
                  group_size: int, bits: int = 4, sym: bool = False, num_grid: int = NUM_GRID,
                  duo: bool = False) -> ScaleSearch:
    """The grid search of step 2. weights: the group's [N_i, K] float weights; inspect(ws) -> the
    inspected module's output on the calibration input with the group's weights replaced by ws;
    duo: the scales also divide by the weights' own magnitude (`scales_for`'s w_mean)."""
    w_mean = weight_scale(weights, group_size) if duo else None
    with torch.no_grad(), one_thread():
        reference = inspect([w.float() for w in weights]).float()

        def loss_of(s: torch.Tensor) -> float:
            candidates = [fake_quantize(w.float() * s, group_size, bits, sym) / s for w in weights]
            return float((inspect(candidates).float() - reference).pow(2).mean())

        ones = torch.ones_like(x_mean)
        rtn_loss = loss_of(ones)  # s = 1: plain RTN, always a candidate (alpha 0 without duo)
        best: tuple[float, float, torch.Tensor] = (rtn_loss, 0.0, ones)
        for step in range(1 if w_mean is None else 0, num_grid):
            alpha = step / num_grid
            s = scales_for(x_mean, alpha, w_mean)
            loss = loss_of(s)
            if loss < best[0]:
                best = (loss, alpha, s)
    return ScaleSearch(scales=best[2], alpha=best[1], loss=best[0], rtn_loss=rtn_loss)


def fake_quantize(w: torch.Tensor, group_size: int, bits: int, sym: bool) -> torch.Tensor:
    """rtn_grouped(w, ...).dequantize() computed for all groups at once (the search calls it 20 times
    per weight): w [N, K] float32 -> same shape, each value on its group's grid."""
    n, k = w.shape
    g = k if group_size == -1 else group_size
    parts = []
    for lo, hi in ((0, k // g * g), (k // g * g, k)):  # the full groups, then a partial last one
        if hi > lo:
            x = w[:, lo:hi].reshape(-1, min(g, hi - lo))  # [N * groups, g]
            scale, zero = group_grid(x, bits, sym)
            q = quantize_to_grid(x, scale[:, None], zero[:, None], bits).float()
            parts.append((q * scale[:, None] + (-zero * scale)[:, None]).reshape(n, hi - lo))
    return torch.cat(parts, dim=1)


def fold_into_norm(norm_weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """RMSNorm weight [K] whose output is divided by s: weight / s."""
    return norm_weight / scales.to(norm_weight.dtype)


def fold_into_linear(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Previous linear's weight [K, M] (its K outputs feed the group): rows divided by s (a bias too:
    pass it as a [K, 1] tensor)."""
    return weight / scales.to(weight.dtype)[:, None]


def scale_inputs(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """A group linear's weight [N, K] that now reads x / s: W * s (per input column)."""
    return weight * scales.to(weight.dtype)[None, :]


def quantize_scaled(weight: torch.Tensor, group_size: int, bits: int = 4, sym: bool = False) -> GroupedWeight:
    """RTN of an already scaled weight [N, K] (step 3)."""
    return rtn_grouped(weight.float(), group_size, bits, sym)

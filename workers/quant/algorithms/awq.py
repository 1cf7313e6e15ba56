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
The weight-clipping search of llm-awq (`auto_clip`) is not done here.
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


def scales_for(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    s = x_mean.pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def search_scales(x_mean: torch.Tensor, weights: Sequence[torch.Tensor],
                  inspect: Callable[[list[torch.Tensor]], torch.Tensor],
                  group_size: int, bits: int = 4, sym: bool = False, num_grid: int = NUM_GRID) -> ScaleSearch:
    """The grid search of step 2. weights: the group's [N_i, K] float weights; inspect(ws) -> the
    inspected module's output on the calibration input with the group's weights replaced by ws."""
    with torch.no_grad(), one_thread():
        reference = inspect([w.float() for w in weights]).float()
        best: tuple[float, float, torch.Tensor] | None = None
        rtn_loss = float("nan")
        for step in range(num_grid):
            alpha = step / num_grid
            s = scales_for(x_mean, alpha)
            candidates = [fake_quantize(w.float() * s, group_size, bits, sym) / s for w in weights]
            loss = float((inspect(candidates).float() - reference).pow(2).mean())
            if step == 0:
                rtn_loss = loss
            if best is None or loss < best[0]:
                best = (loss, alpha, s)
    assert best is not None
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

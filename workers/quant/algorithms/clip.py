"""Clipping search: each group's grid range shrunk to the factor that minimises its rounding error.

A min-max grid spends its levels on the group's one or two extreme weights; shrinking the range
(clipping those extremes) makes every other weight's step finer. `clipped_grid(w, ...)` tries
shrink factors p between 1 and 1 - max_shrink (coarse steps, then the fine steps around each
row's best) on the range of `group_grid` (rtn.py: [p * min, p * max] asymmetric, p * max|w|
symmetric), rounds the group to each grid, and keeps per row (one group) the p with least error:
  - weight error sum |w - q|^norm (no calibration data: GPTQModel's `mse` option, norm 2.4,
    100 points, down to 0.2), or err^2 weighted by diag(H) per input;
  - or, given the group's input second moment H = X^T X / n [C, C], the output error
    (w - q) H (w - q)^T — what AutoAWQ's `auto_clip` measures on its calibration inputs,
    computed from H instead of the tokens (same value, one [C, C] matrix instead of [n, C]).
    `shardserve quantize` uses this one for RTN, AWQ and GPTQ: on SmolLM2 the weight error made
    RTN's perplexity worse (18.30 -> 18.73) and GPTQ's no better, the output error helped all three.
The factor p = 1 is always a candidate, so a search never does worse than min-max on its error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from shardserve.workers.quant.algorithms.rtn import group_grid, quantize_to_grid
from shardserve.workers.quant.weights import GroupedWeight


@dataclass(frozen=True)
class ClipSearch:
    """Shrink factors p = 1 - i / num_grid down to 1 - max_shrink, searched coarse to fine: every
    `coarse`-th factor first, then each row's neighbours of its best one (26 error evaluations
    instead of 81 for the defaults); norm: exponent of the weight error (unused with a Hessian)."""

    num_grid: int = 100
    max_shrink: float = 0.8
    norm: float = 2.4
    coarse: int = 5

    def __post_init__(self) -> None:
        if self.num_grid < 1 or self.coarse < 1:
            raise ValueError(f"clip num_grid and coarse must be >= 1, got {self.num_grid}, {self.coarse}")
        if not 0 <= self.max_shrink < 1:
            raise ValueError(f"clip max_shrink must be in [0, 1), got {self.max_shrink}")
        if self.norm <= 0:
            raise ValueError(f"clip norm must be > 0, got {self.norm}")

    @property
    def num_steps(self) -> int:
        return int(round(self.max_shrink * self.num_grid))


WEIGHT_MSE = ClipSearch()  # GPTQModel's `mse` grid (norm 2.4, step 0.01, down to 0.2)
OUTPUT_MSE = ClipSearch(num_grid=20, max_shrink=0.5, coarse=1)  # AutoAWQ's auto_clip grid


def clipped_grid(w: torch.Tensor, bits: int, sym: bool, search: ClipSearch,
                 hessian: torch.Tensor | None = None,
                 column_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per row of w [R, C] (one group per row), float32 [R] each, like group_grid's;
    hessian: the group's input second moment [C, C], or None for the weight error; column_weight:
    its diagonal [C] alone (the squared error of each input weighted by its energy)."""
    w = w.float()
    maxq = (1 << bits) - 1
    base_scale, base_zero = group_grid(w, bits, sym)
    lo, hi = w.amin(dim=1).clamp(max=0), w.amax(dim=1).clamp(min=0)

    def grid(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # p [R]: shrink per row
        if sym:
            return base_scale * p, base_zero
        scale = (hi - lo) * p / maxq
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        return scale, torch.round(-lo * p / scale)

    def error(p: torch.Tensor) -> torch.Tensor:
        scale, zero = grid(p)
        q = torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, maxq)  # as quantize_to_grid
        diff = (q - zero[:, None]) * scale[:, None] - w  # [R, C]
        if hessian is not None:
            return ((diff @ hessian) * diff).sum(dim=1)
        if column_weight is not None:
            return (diff.square() * column_weight).sum(dim=1)
        return diff.square().sum(dim=1) if search.norm == 2 else diff.abs().pow(search.norm).sum(dim=1)

    best_step = torch.zeros_like(base_scale)  # i of p = 1 - i / num_grid, per row
    best_err = error(torch.ones_like(base_scale))
    candidates = [torch.full_like(base_scale, i) for i in range(search.coarse, search.num_steps + 1, search.coarse)]
    for rounds in range(2):
        for step in candidates:
            err = error(1 - step / search.num_grid)
            better = err < best_err
            best_err, best_step = torch.where(better, err, best_err), torch.where(better, step, best_step)
        if rounds == 0 and search.coarse > 1:  # each row's neighbours of its best coarse factor
            centre = best_step.clone()
            candidates = [(centre + j).clamp(0, search.num_steps) for j in range(1 - search.coarse, search.coarse)
                          if j != 0]
        else:
            break
    return grid(1 - best_step / search.num_grid)


def clipped_grouped(w: torch.Tensor, group_size: int, bits: int, sym: bool, search: ClipSearch,
                    hessian: torch.Tensor | None = None) -> GroupedWeight:
    """rtn_grouped with each group's grid from `clipped_grid`: w [N, K] -> GroupedWeight;
    hessian [K, K] (the linear's input second moment; each group uses its diagonal block) or None."""
    n, k = w.shape
    g = k if group_size == -1 else group_size
    num_groups = -(-k // g)
    q = torch.empty(n, k, dtype=torch.uint8)
    scales = torch.empty(n, num_groups)
    zeros = torch.empty(n, num_groups)
    for i in range(num_groups):
        cols = slice(i * g, min((i + 1) * g, k))
        block = None if hessian is None else hessian[cols, cols].float()
        scale, zero = clipped_grid(w[:, cols], bits, sym, search, block)
        q[:, cols] = quantize_to_grid(w[:, cols].float(), scale[:, None], zero[:, None], bits)
        scales[:, i], zeros[:, i] = scale, zero
    return GroupedWeight(q=q, scales=scales, mins=-zeros * scales, group_size=g, bits=bits)

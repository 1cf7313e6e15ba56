"""Round-to-nearest quantization of one float weight: the at-load methods and GPTQ's grid.

`grid_int4`-style helpers compute each group's scale and zero point from its min / max (asymmetric)
or its largest magnitude (symmetric, zero point 2**(bits-1), the GPTQ convention); `rtn_grouped`
rounds every weight to that grid. INT8 is symmetric per output channel (scale = max|w| / 127), FP8
per output channel (scale = max|w| / 448, e4m3's largest normal).
"""

from __future__ import annotations

import torch
from shardserve.workers.quant.weights import Fp8Weight, GroupedWeight, Int8Weight

FP8_MAX = 448.0


def group_grid(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per row of w [R, C] (one group per row): float32 [R] each."""
    maxq = (1 << bits) - 1
    w = w.float()
    if sym:
        amax = w.abs().amax(dim=1)
        scale = 2 * amax / maxq
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        lo, hi = w.amin(dim=1).clamp(max=0), w.amax(dim=1).clamp(min=0)
        scale = (hi - lo) / maxq
        zero = torch.round(-lo / torch.where(scale == 0, torch.ones_like(scale), scale))
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero group
    return scale, zero


def quantize_to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer levels of w [R, C] on the grid (scale, zero) [R] or broadcastable: uint8."""
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, (1 << bits) - 1).to(torch.uint8)


def rtn_grouped(w: torch.Tensor, group_size: int, bits: int = 4, sym: bool = True) -> GroupedWeight:
    """w [N, K] float -> GroupedWeight with groups of `group_size` inputs (-1: one group per row)."""
    n, k = w.shape
    g = k if group_size == -1 else group_size
    q = torch.empty(n, k, dtype=torch.uint8, device=w.device)
    groups = -(-k // g)
    scales = torch.empty(n, groups, device=w.device)
    zeros = torch.empty(n, groups, device=w.device)
    for i in range(groups):
        cols = w[:, i * g:(i + 1) * g].float()
        scale, zero = group_grid(cols, bits, sym)
        q[:, i * g:(i + 1) * g] = quantize_to_grid(cols, scale[:, None], zero[:, None], bits)
        scales[:, i], zeros[:, i] = scale, zero
    return GroupedWeight(q=q, scales=scales, mins=-zeros * scales, group_size=g, bits=bits)


def rtn_int8(w: torch.Tensor) -> Int8Weight:
    """Symmetric per-channel INT8: w [N, K] -> Int8Weight (on w's device)."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = torch.clamp(torch.round(w / scales[:, None]), -127, 127).to(torch.int8)
    return Int8Weight(q=q, scales=scales)


def rtn_fp8(w: torch.Tensor) -> Fp8Weight:
    """Per-channel FP8 e4m3: w [N, K] -> Fp8Weight (on w's device)."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
    q = (w / scales[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return Fp8Weight(q=q, scales=scales)

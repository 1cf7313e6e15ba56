"""The min-max integer grid shared by GPTQ and AWQ: per-row (per group) scale and zero point.

A slice w [N, g] of a weight gets, per row, the grid that spans [min(w, 0), max(w, 0)]:
asymmetric: scale = (max - min) / maxq, zero = round(-min / scale); symmetric: the span is
[-absmax, absmax] and zero = (maxq + 1) / 2 (8 for 4 bits, 128 for 8 bits), as GPTQ's reference
quantizer does. Values map to q = clamp(round(w / scale) + zero, 0, maxq) and come back as
q * scale + min with min = -zero * scale — the exact formula `Int4Weight.dequantize` uses, so
the error GPTQ feeds back is the error the served model sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Grid:
    """scale, min: float32 [N, 1]; zero: float32 [N, 1] (an integer value); maxq = 2**bits - 1."""

    scale: torch.Tensor
    zero: torch.Tensor
    maxq: int

    @property
    def min(self) -> torch.Tensor:
        return -self.zero * self.scale

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        """w [N, c] -> integer codes [N, c] as float32 in 0..maxq."""
        return torch.clamp(torch.round(w / self.scale) + self.zero, 0, self.maxq)

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        return q * self.scale + self.min


def find_grid(w: torch.Tensor, bits: int, sym: bool) -> Grid:
    """The min-max grid of each row of w [N, c] (float32)."""
    maxq = 2**bits - 1
    zeros = torch.zeros(w.shape[0], device=w.device, dtype=w.dtype)
    wmin = torch.minimum(w.min(dim=1).values, zeros)
    wmax = torch.maximum(w.max(dim=1).values, zeros)
    if sym:
        wmax = torch.maximum(wmin.abs(), wmax)
        wmin = -wmax
    empty = (wmin == 0) & (wmax == 0)  # an all-zero row: any grid works, keep it finite
    wmin[empty], wmax[empty] = -1.0, 1.0
    scale = (wmax - wmin) / maxq
    zero = torch.full_like(scale, (maxq + 1) // 2) if sym else torch.round(-wmin / scale)
    return Grid(scale=scale[:, None], zero=zero[:, None], maxq=maxq)


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    """w [N, K] rounded to its group-wise grid and back (RTN), same shape and dtype float32."""
    n, k = w.shape
    groups = w.float().reshape(n * (k // group_size), group_size)
    grid = find_grid(groups, bits, sym)
    return grid.dequantize(grid.quantize(groups)).reshape(n, k)

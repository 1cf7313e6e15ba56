"""GPTQ (Frantar et al., 2022): one linear weight quantized column by column with error feedback.

Data flow: calibration inputs x [tokens, K] of the layer go into a `Hessian` (H = 2/n X^T X,
a running mean so batches can stream in). `gptq_quantize(w, H, ...)` then
  1. optionally reorders the input columns by decreasing diag(H) (act-order, `desc_act`): the
     columns with the largest input energy are quantized first, while most columns are still
     free to absorb their error;
  2. damps H (adds percdamp * mean(diag H) to the diagonal) and takes the upper Cholesky
     factor of H^-1, which gives each column's error-feedback row;
  3. walks blocks of `block_size` columns: each column is rounded to its group's min-max grid
     (rtn.py's `group_grid`, so RTN and GPTQ share one grid; a group's grid is fixed when its first column is reached, from the weights
     already updated by the error of earlier columns), and its error (w - q) / Hinv[i, i] is
     pushed onto the columns not yet quantized, inside the block at once, beyond it lazily.
The result is weights.py's unpacked `GroupedWeight` of 4 or 8 bits (act-order: columns stay in
the order quantized, `perm` names their input feature, groups are consecutive in that order —
what a GPTQ `g_idx` describes), which formats/gptq.py packs.
Pure torch in float32, as the reference implementation (IST-DASLab/gptq) does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from shardserve.workers.quant.algorithms.clip import OUTPUT_MSE, ClipSearch, clipped_grid
from shardserve.workers.quant.algorithms.rtn import group_grid, quantize_to_grid
from shardserve.workers.quant.weights import GroupedWeight

BITS = (4, 8)
GROUP_SIZES = (-1, 32, 64, 128)
CLIP_ERRORS = ("weight", "energy", "output")


class Hessian:
    """Running H = 2/n sum_t x_t x_t^T over the calibration tokens of one linear's input; with
    `asymmetric`, also dXXT = 2/n sum_t (x~_t - x_t) x_t^T, x~ the input the float model gives (GPTAQ)."""

    def __init__(self, in_features: int, asymmetric: bool = False) -> None:
        self.matrix = torch.zeros(in_features, in_features, dtype=torch.float32)  # [K, K]
        self.dxxt = torch.zeros_like(self.matrix) if asymmetric else None
        self.num_tokens = 0

    def add(self, x: torch.Tensor, x_float: torch.Tensor | None = None) -> None:
        """x [..., K]: one batch of inputs as the linear saw them; x_float: the same tokens' inputs in
        the float model (required with `asymmetric`)."""
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)  # [tokens, K]
        total = self.num_tokens + x.shape[0]
        self.matrix *= self.num_tokens / total
        x = x * (2.0 / total) ** 0.5
        self.matrix += x.T @ x
        if self.dxxt is not None:
            if x_float is None:
                raise ValueError("an asymmetric Hessian needs the float model's inputs too")
            self.dxxt *= self.num_tokens / total
            x_float = x_float.detach().reshape(-1, x_float.shape[-1]).to(torch.float32) * (2.0 / total) ** 0.5
            self.dxxt += (x_float - x).T @ x
        self.num_tokens = total


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, bits: int = 4, group_size: int = 128,
                  sym: bool = True, desc_act: bool = False, percdamp: float = 0.01,
                  block_size: int = 128, clip: ClipSearch | None = None,
                  static_groups: bool = False, clip_error: str = "weight",
                  dxxt: torch.Tensor | None = None, dxxt_alpha: float = 0.25) -> GroupedWeight:
    """w [N, K] float, hessian [K, K] -> GroupedWeight of `bits` (4 or 8) with groups of `group_size`
    input columns (-1: one group per row; the last group may be partial, e.g. K = 576, g = 128);
    clip: each group's grid from clip.py's search (None: min-max); static_groups: every grid is
    fixed first, from the weights before any error feedback, on groups of consecutive inputs in
    the checkpoint's order — with desc_act the columns are still quantized in act-order, but the
    result needs no `perm` (g_idx = k // g), so kernels skip the input permutation; clip_error: what
    the clipping search minimises — "weight" |err|^norm, "energy" err^2 weighted by diag(H), or
    "output" err H_gg err^T with the group's block of H (its output error on the calibration inputs);
    dxxt: Hessian.dxxt of an asymmetric Hessian (GPTAQ, Li et al. 2025: the target is the float
    model's output W x~, not W x, so each quantized column also moves the later ones by
    w_i P[i, :], P = dxxt_alpha * triu(dXXT U^T, 1) U with U the error-feedback factor)."""
    if clip_error not in CLIP_ERRORS:
        raise ValueError(f"clip_error must be one of {CLIP_ERRORS}, got {clip_error!r}")
    n, k = w.shape
    if bits not in BITS:
        raise ValueError(f"GPTQ bits must be one of {BITS}, got {bits}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"GPTQ group_size must be one of {GROUP_SIZES}, got {group_size}")
    g = k if group_size == -1 else group_size
    block_size = max(block_size // g, 1) * g  # a group never straddles two blocks
    if not 0 < percdamp < 1:
        raise ValueError(f"percdamp must be in (0, 1), got {percdamp}")
    if tuple(hessian.shape) != (k, k):
        raise ValueError(f"hessian has shape {tuple(hessian.shape)}, expected {(k, k)} for a weight of {(n, k)}")

    w = w.detach().to(torch.float32).clone()
    h = hessian.detach().to(torch.float32).clone()
    dead = torch.diag(h) == 0  # inputs never active: their weights cannot matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    if dxxt is not None:
        dxxt = dxxt.detach().to(torch.float32).clone()
        dxxt[:, dead] = 0.0
    num_groups = -(-k // g)
    codes = torch.zeros(n, k, dtype=torch.uint8)
    scales = torch.zeros(n, num_groups)
    zeros = torch.zeros(n, num_groups)
    with one_thread():  # small ops: on a busy CPU, thread hand-offs cost 5-20x more than they save
        group_of = None
        if static_groups:
            for i in range(num_groups):
                s, z = _grid(w[:, i * g:(i + 1) * g], h, i * g, bits, sym, clip, clip_error)
                scales[:, i], zeros[:, i] = s.half().float().clamp(min=2**-24), z
            group_of = torch.arange(k) // g  # [K], the group of each column in quantization order
        perm = torch.argsort(torch.diag(h), descending=True) if desc_act else None
        if perm is not None:
            w, h = w[:, perm], h[perm][:, perm]
            dxxt = None if dxxt is None else dxxt[perm][:, perm]
            if group_of is not None:
                group_of = group_of[perm]
        hinv = _inverse_cholesky(h, percdamp)  # [K, K] upper triangular
        p = None if dxxt is None else dxxt_alpha * torch.triu(dxxt @ hinv.T, diagonal=1) @ hinv
        _quantize_columns(w, hinv, codes, scales, zeros, g, block_size, bits, sym, group_of,
                          lambda cols, col: _grid(cols, h, col, bits, sym, clip, clip_error), p)
    if static_groups and perm is not None:  # codes back to the checkpoint's input order
        codes = torch.empty_like(codes).index_copy_(1, perm, codes)
        perm = None
    return GroupedWeight(q=codes, scales=scales, mins=-zeros * scales, group_size=g, perm=perm, bits=bits)


def _quantize_columns(w: torch.Tensor, hinv: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                      zeros: torch.Tensor, g: int, block_size: int, bits: int, sym: bool,
                      group_of: torch.Tensor | None,
                      grid: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]],
                      p: torch.Tensor | None = None) -> None:
    """Step 3 in place: w [N, K] (consumed), codes [N, K], scales / zeros [N, G] (filled, or given:
    static groups, with group_of [K] the group of each column); p [K, K]: GPTAQ's extra feedback."""
    n, k = w.shape
    scale = zero = torch.zeros(n, 1)
    for start in range(0, k, block_size):
        end = min(start + block_size, k)
        w_block = w[:, start:end].clone()  # [N, B], updated in place by the columns before
        err_block = torch.zeros_like(w_block)
        hinv_block = hinv[start:end, start:end]
        for i in range(end - start):
            col = start + i
            if group_of is not None:
                group = int(group_of[col])
                scale, zero = scales[:, group:group + 1], zeros[:, group:group + 1]
            elif col % g == 0:  # the group's grid, from weights already carrying earlier errors
                s, z = grid(w_block[:, i:i + g], col)
                s = s.half().float().clamp(min=2**-24)  # checkpoints store fp16 scales: use those
                scales[:, col // g], zeros[:, col // g] = s, z
                scale, zero = s[:, None], z[:, None]
            q = quantize_to_grid(w_block[:, i:i + 1], scale, zero, bits)  # [N, 1]
            codes[:, col] = q[:, 0]
            dq = q[:, 0].float() * scale[:, 0] + (-zero[:, 0] * scale[:, 0])  # as GroupedWeight.dequantize
            err = (w_block[:, i] - dq) / hinv_block[i, i]  # [N]
            update = err[:, None] * hinv_block[i, i:][None, :]
            if p is not None:  # p[i, i] = 0: column i still ends on dq
                update -= w_block[:, i:i + 1] * p[col, col:end][None, :]
            w_block[:, i:] -= update
            err_block[:, i] = err
        w[:, end:] -= err_block @ hinv[start:end, end:]
        if p is not None:  # w_block's columns now hold their quantized values
            w[:, end:] += w_block @ p[start:end, end:]


def _grid(cols: torch.Tensor, h: torch.Tensor, start: int, bits: int, sym: bool, clip: ClipSearch | None,
          clip_error: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid of the group whose columns cols [N, g] start at column `start` of h (same order)."""
    if clip is None:
        return group_grid(cols, bits, sym)
    block = h[start:start + cols.shape[1], start:start + cols.shape[1]]
    if clip_error == "output":
        return clipped_grid(cols, bits, sym, OUTPUT_MSE, hessian=block)
    if clip_error == "energy":
        return clipped_grid(cols, bits, sym, clip, column_weight=torch.diagonal(block))
    return clipped_grid(cols, bits, sym, clip)


@contextmanager
def one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _inverse_cholesky(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1, damp = percdamp * mean(diag H); more damping if
    H is not positive definite in float32 (e.g. fewer calibration tokens than inputs)."""
    damp = percdamp * torch.mean(torch.diag(h))
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    for _ in range(6):
        factor, info = torch.linalg.cholesky_ex(h + damp * eye)
        if info == 0:
            inverse = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if info == 0:
                return upper
        damp = damp * 10
    raise ValueError("GPTQ: the Hessian is not positive definite even with 1e6x damping; "
                     "is the calibration input all zeros?")

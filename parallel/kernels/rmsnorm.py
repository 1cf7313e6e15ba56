"""Fused residual add + RMSNorm, one program per token row.

Data flow: `x [T, H]` (this layer's output) and optionally `residual [T, H]` (the running
residual stream) come in. The program adds them (fp32, rounded once to x's dtype — the
value the next layer's residual holds, as in Hugging Face's `residual + hidden` in the
model dtype), computes `rstd = 1 / sqrt(mean(h^2) + eps)` in fp32 over the rounded sum,
rounds `h * rstd` to the dtype and multiplies by `weight [H]` (Hugging Face LlamaRMSNorm's
`weight * hidden.to(input_dtype)`), storing `out [T, H]` and `new_residual [T, H]`.
Without a residual, `new_residual` is `x` itself (no copy).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from shardserve.parallel.kernels.pdl import pdl_options, release_next, wait_for_previous


@triton.jit
def residual_norm_store(
    h, row, residual_ptr, w, out_ptr, new_residual_ptr, eps, hidden_size, stride_r, stride_o, stride_nr,
    offs, mask, HAS_RESIDUAL: tl.constexpr,
):
    """The shared epilogue: h [BLOCK] fp32 (already rounded to the dtype) -> add the residual row
    (rounded once), store it as the new residual, normalise and store `out`. Also used by the
    fused all-reduce kernels (allreduce_rmsnorm.py), so they compute exactly what this one does."""
    dtype = out_ptr.dtype.element_ty
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        h_rounded = (h + r).to(new_residual_ptr.dtype.element_ty)
        tl.store(new_residual_ptr + row * stride_nr + offs, h_rounded, mask=mask)
        h = h_rounded.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, 0) / hidden_size + eps)
    normed = (h * rstd).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (normed * w).to(dtype), mask=mask)


@triton.jit
def _rmsnorm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, new_residual_ptr,
    eps, hidden_size,
    stride_x, stride_r, stride_o, stride_nr,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):
    wait_for_previous(USE_PDL)
    release_next(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)  # [BLOCK] >= H
    mask = offs < hidden_size
    h = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    residual_norm_store(h, row, residual_ptr, w, out_ptr, new_residual_ptr, eps, hidden_size, stride_r, stride_o,
                        stride_nr, offs, mask, HAS_RESIDUAL)


def check_norm_args(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> tuple[int, int]:
    """(num_tokens, hidden_size) of a valid [T, H] x with weight [H] and an optional residual [T, H]."""
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be 2-D [num_tokens, hidden_size] with a contiguous last dim, got {tuple(x.shape)}")
    num_tokens, hidden_size = x.shape
    if weight.shape != (hidden_size,) or weight.stride(0) != 1:
        raise ValueError(f"weight must be contiguous with shape ({hidden_size},), got {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.stride(-1) != 1):
        raise ValueError(f"residual shape {tuple(residual.shape)} must equal x shape {tuple(x.shape)}, last dim contiguous")
    return num_tokens, hidden_size


def rmsnorm(
    x: torch.Tensor,  # [T, H]
    weight: torch.Tensor,  # [H]
    eps: float,
    residual: torch.Tensor | None = None,  # [T, H]
) -> tuple[torch.Tensor, torch.Tensor]:  # (out [T, H], new_residual [T, H])
    """`new_residual = x + residual` (or `x`), `out = rmsnorm(new_residual) * weight`."""
    num_tokens, hidden_size = check_norm_args(x, weight, residual)
    out = torch.empty_like(x)
    new_residual = x if residual is None else torch.empty_like(x)
    if num_tokens == 0:
        return out, new_residual
    _rmsnorm_kernel[(num_tokens,)](
        x, x if residual is None else residual, weight, out, new_residual,
        eps, hidden_size,
        x.stride(0), x.stride(0) if residual is None else residual.stride(0), out.stride(0), new_residual.stride(0),
        HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(hidden_size),
        num_warps=8 if hidden_size >= 4096 else 4, **pdl_options(x.device),
    )
    return out, new_residual

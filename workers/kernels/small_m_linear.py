"""Linear layers for decode batches of a few rows, with the neighbouring elementwise work fused in.

At batch 1..16 a decode step reads every weight once and does little else, so each linear is a
weight-bandwidth-bound matrix-vector product; the RMSNorm before it and the SiLU-and-mul after
the gate/up projection are separate launches of a few microseconds each. `small_m_linear` does
all three in one kernel:

    x [M, K] (+ residual [M, K])  --add, rmsnorm * norm_weight--> a [M, K]   (optional prologue)
    a @ W[N, K]^T                                             --> y [M, N]
    silu(y[:, :N/2]) * y[:, N/2:]                             --> out [M, N/2] (optional epilogue)

Program n owns BLOCK_N output columns (both halves of gate/up for the epilogue) and streams its
rows of W once over K in BLOCK_K chunks; the M (<= BLOCK_M = 16) activation rows ride along in
a tensor-core dot (padding rows are masked). With the norm, every program first sums the squares
of its rows of `x + residual` (a few KiB, served from L2) and program 0 also stores the new
residual stream. Rounding follows the unfused kernels step for step (the sum of x and residual,
the normed activations, the projection and the activation are each rounded to the model dtype),
so the fused layer differs from them only by the matmul's accumulation order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_ROWS = 16  # rows per call: one M tile of the tensor-core dot


@dataclass(frozen=True)
class GemvTiles:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


INTERPRETER_TILES = GemvTiles(16, 32, 4, 1)
DEFAULT_TILES = GemvTiles(32, 256, 4, 4)


@triton.jit
def _small_m_linear_kernel(
    x_ptr, res_ptr, norm_w_ptr, new_res_ptr, w_ptr, out_ptr,
    M, N_OUT, K, eps,
    stride_xm, stride_rm, stride_nrm, stride_wn, stride_om,
    HAS_NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SILU_MUL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    dtype = out_ptr.dtype.element_ty
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    rstd = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if HAS_NORM:  # pass 1: mean of squares of each row of x (+ residual), as rounded
        sumsq = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask = mask_m[:, None] & (offs_k[None, :] < K)
            h = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0)
            if HAS_RESIDUAL:
                r = tl.load(res_ptr + offs_m[:, None] * stride_rm + offs_k[None, :], mask=mask, other=0.0)
                h = (h.to(tl.float32) + r.to(tl.float32)).to(dtype)
                if pid == 0:
                    tl.store(new_res_ptr + offs_m[:, None] * stride_nrm + offs_k[None, :], h, mask=mask)
            hf = h.to(tl.float32)
            sumsq += tl.sum(hf * hf, axis=1)
        rstd = 1.0 / tl.sqrt(sumsq / K + eps)

    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N_OUT
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        mask = mask_m[:, None] & mask_k[None, :]
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0)
        if HAS_NORM:
            if HAS_RESIDUAL:
                r = tl.load(res_ptr + offs_m[:, None] * stride_rm + offs_k[None, :], mask=mask, other=0.0)
                a = (a.to(tl.float32) + r.to(tl.float32)).to(dtype)
            g = tl.load(norm_w_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
            normed = (a.to(tl.float32) * rstd[:, None]).to(dtype).to(tl.float32)
            a = (normed * g[None, :]).to(dtype)
        w_mask = mask_n[:, None] & mask_k[None, :]
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=w_mask, other=0.0)
        acc += tl.dot(a, tl.trans(w), input_precision="ieee")
        if SILU_MUL:  # the up half of the merged weight: rows N_OUT + n
            w_up = tl.load(w_ptr + (N_OUT + offs_n[:, None]) * stride_wn + offs_k[None, :], mask=w_mask, other=0.0)
            acc_up += tl.dot(a, tl.trans(w_up), input_precision="ieee")
    out = acc.to(dtype)
    if SILU_MUL:
        gate = out.to(tl.float32)
        up = acc_up.to(dtype).to(tl.float32)
        out = (gate / (1.0 + tl.exp(-gate)) * up).to(dtype)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], out, mask=mask_m[:, None] & mask_n[None, :])


def small_m_linear(
    x: torch.Tensor,  # [M, K], M <= MAX_ROWS
    weight: torch.Tensor,  # [N, K] (gate/up stacked as [gate; up] when silu_mul)
    norm_weight: torch.Tensor | None = None,  # [K]: rmsnorm(x (+ residual)) * norm_weight first
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,  # [M, K]: added to x before the norm (needs norm_weight)
    silu_mul: bool = False,
    tiles: GemvTiles | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out [M, N] or [M, N/2] with silu_mul, new residual [M, K] when `residual` is given)."""
    if x.dim() != 2 or x.stride(-1) != 1 or weight.dim() != 2 or weight.stride(-1) != 1:
        raise ValueError("x [M, K] and weight [N, K] must be 2-D with a contiguous last dim")
    num_rows, k = x.shape
    n = weight.shape[0]
    if num_rows > MAX_ROWS:
        raise ValueError(f"small_m_linear takes at most {MAX_ROWS} rows, got {num_rows}")
    if weight.shape[1] != k:
        raise ValueError(f"weight {tuple(weight.shape)} does not match x {tuple(x.shape)}")
    if residual is not None and (norm_weight is None or residual.shape != x.shape or residual.stride(-1) != 1):
        raise ValueError("a residual needs norm_weight and the shape of x with a contiguous last dim")
    if norm_weight is not None and norm_weight.shape != (k,):
        raise ValueError(f"norm_weight must have shape ({k},), got {tuple(norm_weight.shape)}")
    if silu_mul and n % 2:
        raise ValueError(f"silu_mul needs an even number of output features, got {n}")
    n_out = n // 2 if silu_mul else n
    out = torch.empty(num_rows, n_out, dtype=x.dtype, device=x.device)
    new_residual = torch.empty_like(x) if residual is not None else None
    if num_rows == 0:
        return out, new_residual
    t = tiles or (INTERPRETER_TILES if x.device.type != "cuda" else DEFAULT_TILES)
    res = residual if residual is not None else x
    _small_m_linear_kernel[(triton.cdiv(n_out, t.block_n),)](
        x, res, norm_weight if norm_weight is not None else x, new_residual if new_residual is not None else x,
        weight, out,
        num_rows, n_out, k, eps,
        x.stride(0), res.stride(0), (new_residual if new_residual is not None else x).stride(0), weight.stride(0),
        out.stride(0),
        HAS_NORM=norm_weight is not None, HAS_RESIDUAL=residual is not None, SILU_MUL=silu_mul,
        BLOCK_M=MAX_ROWS, BLOCK_N=t.block_n, BLOCK_K=t.block_k, num_warps=t.num_warps, num_stages=t.num_stages,
    )
    return out, new_residual

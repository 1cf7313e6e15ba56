"""Decode-size linear layers: `y = x @ W^T (+ bias)` for a few rows, weights read ahead under PDL.

Why not cuBLAS at decode size: a projection of 1..16 rows is a weight-streaming matrix-vector
product whose cost beyond bytes / bandwidth is per kernel: the drain of the kernel before it, the
launch, and the ramp of the first HBM round trips (the third session measured the 4096 x 4096
projection at ~21 us for ~11 us of bytes, whatever the grid; at TP 4 every projection is a
quarter of the size and those fixed costs weigh more). cuBLAS is launched without programmatic
dependent launch, so each projection starts only once the kernel before it has drained. This
kernel is launched with PDL (pdl.py) and each program reads its first chunk of weights *before*
`griddepcontrol.wait`: weights are never written while serving, so they may stream in while the
norm, the attention or the fused all-reduce before it still runs; only the activations wait.
This is the one place besides l2_prefetch.py that touches memory before the wait (pdl.py's rule
is about buffers an earlier kernel may still write; weights are not such a buffer).

Data flow: program n owns output features [n * BLOCK_N, (n + 1) * BLOCK_N) and streams those rows
of W [N, K] once over K in BLOCK_K chunks (the first chunk before the wait). One row (batch-1
decode) uses CUDA-core FMAs into [BLOCK_N] fp32 accumulators, which allows BLOCK_N below 16
(enough programs for the small projections of TP 4); 2..16 rows use a tensor-core dot with the
rows padded to 16. `silu_mul`: W is gate_up's [gate; up] (2I rows); program n streams gate rows
n.. and up rows I + n.., and stores silu(gate) * up [M, I], each of gate and up rounded to the
dtype first, as `silu_and_mul` sees them after an unfused projection (the SiLU-and-mul kernel
disappears from the step). Accumulation is fp32; the bias is added before the one rounding.

`SHARDSERVE_DECODE_GEMV=0` sends everything to cuBLAS (A/B runs); `wanted_for` says which calls
this kernel takes (CUDA, bf16/fp16, at most MAX_ROWS rows, contiguous operands). Tiles come from
`default_tiles` (by shape and SM count) unless `SHARDSERVE_GEMV_TILES` names a table tuned on the
card by `benchmarks/gemv_gpu.py --sweep --write-tiles`.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from shardserve.workers.kernels.pdl import pdl_options, release_next, wait_for_previous

ENV_DECODE_GEMV = "SHARDSERVE_DECODE_GEMV"  # "0": cuBLAS for every projection
ENV_GEMV_TILES = "SHARDSERVE_GEMV_TILES"  # a JSON table of tuned tiles (tuned_tiles)
MAX_ROWS = 16  # one M tile of the tensor-core dot; larger steps are compute-bound GEMMs for cuBLAS


@dataclass(frozen=True)
class GemvTiles:
    block_n: int  # output features per program (>= 16 for the dot path)
    block_k: int  # columns of W per iteration; the first chunk is read before the PDL wait
    num_warps: int
    num_stages: int


@triton.jit
def _partial(acc, x_ptr, stride_xm, offs_m, mask_m, offs_k, mask_k, w, ONE_ROW: tl.constexpr):
    """acc + x[:, offs_k] @ w^T, w: [BLOCK_N, BLOCK_K] already loaded."""
    if ONE_ROW:
        a = tl.load(x_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)  # [BLOCK_K]
        acc += tl.sum(w.to(tl.float32) * a[None, :], axis=1)
    else:
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0)  # [BLOCK_M, BLOCK_K]
        acc += tl.dot(a, tl.trans(w), input_precision="ieee")
    return acc


@triton.jit
def _decode_linear_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr,
    M, N_OUT, K, stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr, ONE_ROW: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    dtype = out_ptr.dtype.element_ty
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N_OUT
    offs_k = tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    gate_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn  # [BLOCK_N, 1]
    up_rows = w_ptr + (N_OUT + offs_n[:, None]).to(tl.int64) * stride_wn  # used with SILU_MUL only
    # Weights only: read before waiting on the previous kernel (see the module docstring).
    mask_k = offs_k < K
    w_mask = mask_n[:, None] & mask_k[None, :]
    w = tl.load(gate_rows + offs_k[None, :], mask=w_mask, other=0.0)
    w_up = w
    if SILU_MUL:
        w_up = tl.load(up_rows + offs_k[None, :], mask=w_mask, other=0.0)
    wait_for_previous(USE_PDL)
    release_next(USE_PDL)

    if ONE_ROW:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = acc
    acc = _partial(acc, x_ptr, stride_xm, offs_m, mask_m, offs_k, mask_k, w, ONE_ROW)
    if SILU_MUL:
        acc_up = _partial(acc_up, x_ptr, stride_xm, offs_m, mask_m, offs_k, mask_k, w_up, ONE_ROW)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < K
        w_mask = mask_n[:, None] & mask_k[None, :]
        w = tl.load(gate_rows + kk[None, :], mask=w_mask, other=0.0)
        acc = _partial(acc, x_ptr, stride_xm, offs_m, mask_m, kk, mask_k, w, ONE_ROW)
        if SILU_MUL:
            w_up = tl.load(up_rows + kk[None, :], mask=w_mask, other=0.0)
            acc_up = _partial(acc_up, x_ptr, stride_xm, offs_m, mask_m, kk, mask_k, w_up, ONE_ROW)

    if HAS_BIAS:
        if ONE_ROW:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        else:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = acc.to(dtype)
    if SILU_MUL:
        gate = out.to(tl.float32)
        up = acc_up.to(dtype).to(tl.float32)
        out = (gate / (1.0 + tl.exp(-gate)) * up).to(dtype)
    if ONE_ROW:
        tl.store(out_ptr + offs_n, out, mask=mask_n)
    else:
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], out, mask=mask_m[:, None] & mask_n[None, :])


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def default_tiles(rows: int, n_out: int, k: int, num_sms: int) -> GemvTiles:
    """Tiles by shape: one chunk of 512 columns per iteration, and enough programs for >= 2 per SM
    (one-row FMAs may go down to 4 features per program; the dot needs 16)."""
    block_k = min(512, max(16, triton.next_power_of_2(k)))
    if rows == 1:
        block_n = 16
        while block_n > 4 and triton.cdiv(n_out, block_n) < 2 * num_sms:
            block_n //= 2
        return GemvTiles(block_n, block_k, 4, 2)
    return GemvTiles(16, min(block_k, 256), 4, 3)


def tiles_key(rows: int, n_out: int, k: int, silu_mul: bool) -> str:
    """Key of a tuned-tiles table: the kernel path (1 row, or the dot's 16), the shape, the epilogue."""
    return f"{1 if rows == 1 else MAX_ROWS},{n_out},{k},{int(silu_mul)}"


@functools.cache
def tuned_tiles(path: str) -> dict[str, GemvTiles]:
    """A table written by benchmarks/gemv_gpu.py --sweep --write-tiles: {tiles_key: [block_n,
    block_k, num_warps, num_stages]}, named by SHARDSERVE_GEMV_TILES (shapes it lacks use default_tiles)."""
    with open(path) as f:
        return {key: GemvTiles(*value) for key, value in json.load(f).items()}


def interpreter_tiles(rows: int) -> GemvTiles:
    """Small tiles for Triton's interpreter (CI): several programs and K chunks on tiny shapes."""
    return GemvTiles(4 if rows == 1 else 16, 32, 4, 1)


_enabled = True  # process-wide, set with the other fused kernels (models/layers.set_fused_kernels)


def set_enabled(enabled: bool) -> None:
    global _enabled
    _enabled = enabled


def gemv_wanted(environ: dict[str, str] | os._Environ = os.environ) -> bool:
    """False when SHARDSERVE_DECODE_GEMV=0 (A/B runs) or the fused kernels are switched off."""
    return _enabled and environ.get(ENV_DECODE_GEMV, "1").strip() != "0"


def wanted_for(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `decode_linear` takes this call: CUDA, bf16/fp16, 1..MAX_ROWS rows, contiguous last dims."""
    return (x.is_cuda and x.dim() == 2 and 0 < x.shape[0] <= MAX_ROWS and x.dtype in (torch.bfloat16, torch.float16)
            and weight.dtype == x.dtype and weight.dim() == 2 and x.stride(-1) == 1 and weight.stride(-1) == 1
            and gemv_wanted())


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  silu_mul: bool = False, tiles: GemvTiles | None = None) -> torch.Tensor:
    """x [M, K] (M <= MAX_ROWS), weight [N, K] -> x @ weight^T + bias [M, N]; with silu_mul (weight
    [gate; up], N even, no bias) -> silu(gate) * up [M, N / 2]."""
    if x.dim() != 2 or weight.dim() != 2 or x.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError("x [M, K] and weight [N, K] must be 2-D with a contiguous last dim")
    rows, k = x.shape
    n = weight.shape[0]
    if not 0 <= rows <= MAX_ROWS:
        raise ValueError(f"decode_linear takes at most {MAX_ROWS} rows, got {rows}")
    if weight.shape[1] != k:
        raise ValueError(f"weight {tuple(weight.shape)} does not match x {tuple(x.shape)}")
    if silu_mul and (n % 2 or bias is not None):
        raise ValueError(f"silu_mul needs an even number of output features and no bias, got {n}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    n_out = n // 2 if silu_mul else n
    out = torch.empty(rows, n_out, dtype=x.dtype, device=x.device)
    if rows == 0 or n_out == 0:
        return out
    if tiles is None:
        if x.is_cuda:
            table = os.environ.get(ENV_GEMV_TILES)
            tiles = tuned_tiles(table).get(tiles_key(rows, n_out, k, silu_mul)) if table else None
            if tiles is None:
                index = x.device.index if x.device.index is not None else torch.cuda.current_device()
                tiles = default_tiles(rows, n_out, k, _num_sms(index))
        else:
            tiles = interpreter_tiles(rows)
    one_row = rows == 1
    if not one_row and tiles.block_n < 16:
        raise ValueError(f"{rows} rows take the tensor-core dot, which needs at least 16 features a program")
    _decode_linear_kernel[(triton.cdiv(n_out, tiles.block_n),)](
        x, weight, bias if bias is not None else weight, out,
        rows, n_out, k, x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, SILU_MUL=silu_mul, ONE_ROW=one_row,
        BLOCK_M=1 if one_row else MAX_ROWS, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages, **pdl_options(x.device),
    )
    return out

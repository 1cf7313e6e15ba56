"""Batch-1 decode projections: `y = x @ W^T (+ bias)` for one row, weights read ahead under PDL.

Why not cuBLAS at batch 1: a projection of one row is a weight-streaming matrix-vector product
whose cost beyond bytes / bandwidth is per kernel: the drain of the kernel before it, the launch
and the ramp of the first HBM round trips (figures: benchmarks/README.md); at TP 4 every
projection is a quarter of the size and those fixed costs weigh more. cuBLAS is launched without
programmatic dependent launch, so each projection starts only once the kernel before it drained.
This kernel is launched with PDL (pdl.py) and each program reads its first chunk of weights
*before* `griddepcontrol.wait`: weights are never written while serving, so they stream in while
the norm, attention or fused all-reduce before it still runs; only the activations wait (the one
exception to pdl.py's rule besides l2_prefetch.py).

Data flow: program n owns output features [n * BLOCK_N, (n + 1) * BLOCK_N) and streams those rows
of W [N, K] once over K in BLOCK_K chunks, CUDA-core FMAs into [BLOCK_N] fp32 accumulators; the
bias is added in fp32 before the one rounding. `silu_mul`: W is gate_up's [gate; up] and the
kernel stores silu(gate) * up [1, I], each rounded as an unfused projection would. Rows: one (a
tensor-core variant for 2-16 rows lost to cuBLAS: benchmarks/README.md, "Tried and dropped").
`parallel.decode_gemv: false` sends everything to cuBLAS; `wanted_for` says which calls this kernel
takes. Tiles: the card's table from `benchmarks/gemv_gpu.py --sweep --write-tiles` (shipped in
gemv_tiles/<device name>.json, or `parallel.gemv_tiles`), `default_tiles` otherwise.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl
from shardserve.parallel.kernels.pdl import pdl_options, release_next, wait_for_previous
from shardserve.parallel.options import KernelOptions, kernel_options

MAX_ROWS = 1  # batch-1 decode; with 2+ rows cuBLAS wins (a tensor-core variant was 7-9 % slower at 8 rows)


@dataclass(frozen=True)
class GemvTiles:
    block_n: int  # output features per program
    block_k: int  # columns of W per iteration; the first chunk is read before the PDL wait
    num_warps: int
    num_stages: int


@triton.jit
def _widen(w):
    """Weights to fp32 for the FMAs. int8 codes q without a conversion instruction: the int32 q + 0x4B000080
    has the bits of the fp32 2^23 + 128 + q (exact), so one integer add and one fp32 subtract give q."""
    if w.dtype == tl.int8:
        return (w.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
    else:
        return w.to(tl.float32)


@triton.jit
def _decode_linear_kernel(
    x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, N_OUT, K, stride_wn,
    HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, SILU_MUL: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    dtype = out_ptr.dtype.element_ty
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N_OUT
    offs_k = tl.arange(0, BLOCK_K)
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

    a = tl.load(x_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)[None, :]  # [1, BLOCK_K]
    acc = tl.sum(_widen(w) * a, axis=1)  # [BLOCK_N] fp32
    acc_up = acc
    if SILU_MUL:
        acc_up = tl.sum(_widen(w_up) * a, axis=1)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < K
        w_mask = mask_n[:, None] & mask_k[None, :]
        a = tl.load(x_ptr + kk, mask=mask_k, other=0.0).to(tl.float32)[None, :]
        w = tl.load(gate_rows + kk[None, :], mask=w_mask, other=0.0)
        acc += tl.sum(_widen(w) * a, axis=1)
        if SILU_MUL:
            w_up = tl.load(up_rows + kk[None, :], mask=w_mask, other=0.0)
            acc_up += tl.sum(_widen(w_up) * a, axis=1)

    if HAS_SCALE:  # 8-bit weights: one fp32 scale an output row, applied once to the sum
        acc *= tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)
        if SILU_MUL:
            acc_up *= tl.load(s_ptr + N_OUT + offs_n, mask=mask_n, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    out = acc.to(dtype)
    if SILU_MUL:
        gate = out.to(tl.float32)
        up = acc_up.to(dtype).to(tl.float32)
        out = (gate / (1.0 + tl.exp(-gate)) * up).to(dtype)
    tl.store(out_ptr + offs_n, out, mask=mask_n)


def default_tiles(n_out: int, k: int) -> GemvTiles:
    """Tiles for a card without a tuned table: 4 features a program (at least 384 programs for
    every Llama-3.1-8B shard shape, so every SM streams), 1,024 columns a chunk: the winner of 9
    of the 12 TP 1 / 2 / 4 shard shapes in the ninth session's first sweep on an H100."""
    return GemvTiles(4, min(1024, max(16, triton.next_power_of_2(k))), 4, 3)


def default_tiles_8bit(k: int) -> GemvTiles:
    """Tiles for int8 / e4m3 weights (the quantized GEMVs): 2 features a program, 2,048 columns a chunk,
    one stage: within 2 % of each Llama-3.1-8B shape's best in an H100 sweep (benchmarks/gemv_lab.py)."""
    return GemvTiles(2, min(2048, max(16, triton.next_power_of_2(k))), 4, 1)


def tiles_key(n_out: int, k: int, silu_mul: bool, weight_bytes: int = 2) -> str:
    """Key of a tuned-tiles table: the shape, the epilogue and (for 1-byte weights) ",8"."""
    return f"{n_out},{k},{int(silu_mul)}" + (",8" if weight_bytes == 1 else "")


TABLES_DIR = Path(__file__).with_name("gemv_tiles")


@functools.cache
def tuned_tiles(path: str) -> dict[str, GemvTiles]:
    """A table written by benchmarks/gemv_gpu.py --sweep --write-tiles: {tiles_key: [block_n,
    block_k, num_warps, num_stages]}; an empty table when the file does not exist."""
    try:
        with open(path) as f:
            return {key: GemvTiles(*value) for key, value in json.load(f).items()}
    except FileNotFoundError:
        return {}


def table_path(device_name: str, configured: str | None = None) -> str:
    """`configured` (KernelOptions.gemv_tiles) if set, else the table shipped for this card
    (gemv_tiles/<name>.json, spaces as underscores), which may not exist."""
    return configured or str(TABLES_DIR / (device_name.replace(" ", "_") + ".json"))


@functools.cache
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def tiles_for(device: torch.device, n_out: int, k: int, silu_mul: bool, weight_bytes: int = 2) -> GemvTiles:
    """The card's tuned tiles for this shape, else the defaults; small tiles under the interpreter."""
    if device.type != "cuda":
        return GemvTiles(4, 32, 4, 1)  # Triton's interpreter (CI): several programs and K chunks on tiny shapes
    index = device.index if device.index is not None else torch.cuda.current_device()
    table = tuned_tiles(table_path(_device_name(index), kernel_options().gemv_tiles))
    default = default_tiles_8bit(k) if weight_bytes == 1 else default_tiles(n_out, k)
    return table.get(tiles_key(n_out, k, silu_mul, weight_bytes)) or default


_enabled = True  # process-wide, set with the other fused kernels (models/layers.set_fused_kernels)


def set_enabled(enabled: bool) -> None:
    global _enabled
    _enabled = enabled


def gemv_wanted(options: KernelOptions | None = None) -> bool:
    """False when the kernel options turn the decode GEMV off or the fused kernels are switched off."""
    return _enabled and (options or kernel_options()).decode_gemv


def wanted_for(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `decode_linear` takes this call: CUDA, bf16/fp16, one row, contiguous last dims."""
    return (x.is_cuda and x.dim() == 2 and x.shape[0] == MAX_ROWS and x.dtype in (torch.bfloat16, torch.float16)
            and weight.dtype == x.dtype and weight.dim() == 2 and x.stride(-1) == 1 and weight.stride(-1) == 1
            and gemv_wanted())


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  silu_mul: bool = False, tiles: GemvTiles | None = None,
                  scales: torch.Tensor | None = None) -> torch.Tensor:
    """x [1, K], weight [N, K] -> x @ weight^T + bias [1, N]; with silu_mul (weight [gate; up], N
    even, no bias) -> silu(gate) * up [1, N / 2]. `scales` (fp32 [N]): weight holds int8 / e4m3 codes
    and row n is scales[n] * weight[n] (the quantized W8A16 GEMVs of workers/quant/kernels/)."""
    if x.dim() != 2 or weight.dim() != 2 or x.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError("x [1, K] and weight [N, K] must be 2-D with a contiguous last dim")
    rows, k = x.shape
    n = weight.shape[0]
    if rows > MAX_ROWS:
        raise ValueError(f"decode_linear takes at most {MAX_ROWS} row, got {rows}")
    if weight.shape[1] != k:
        raise ValueError(f"weight {tuple(weight.shape)} does not match x {tuple(x.shape)}")
    if silu_mul and (n % 2 or bias is not None):
        raise ValueError(f"silu_mul needs an even number of output features and no bias, got {n}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    if scales is not None and (scales.shape != (n,) or scales.dtype != torch.float32):
        raise ValueError(f"scales must be float32 of shape ({n},), got {scales.dtype} {tuple(scales.shape)}")
    n_out = n // 2 if silu_mul else n
    out = torch.empty(rows, n_out, dtype=x.dtype, device=x.device)
    if rows == 0 or n_out == 0:
        return out
    t = tiles or tiles_for(x.device, n_out, k, silu_mul, weight.element_size())
    _decode_linear_kernel[(triton.cdiv(n_out, t.block_n),)](
        x, weight, scales if scales is not None else weight, bias if bias is not None else weight, out, n_out, k,
        weight.stride(0), HAS_SCALE=scales is not None, HAS_BIAS=bias is not None, SILU_MUL=silu_mul,
        BLOCK_N=t.block_n, BLOCK_K=t.block_k,
        num_warps=t.num_warps, num_stages=t.num_stages, **pdl_options(x.device),
    )
    return out

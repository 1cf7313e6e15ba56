"""FP8 linear on Hopper: W8A16 for decode rows and small batches, W8A8 (e4m3 activations + _scaled_mm) above.

Data flow: `pack_fp8` keeps the e4m3 weight [N, K] as is and hands `_scaled_mm` its transpose, a
column-major [K, N] view (no copy), with the weight scales as an fp32 [1, N] row (a per-tensor
checkpoint's one value repeated: rowwise scaling needs both operands' scales rowwise, and torch's
rowwise _scaled_mm takes scale_a [M, 1] and scale_b [1, N], both fp32). `fp8_linear` quantizes x
[M, K] one row a program (`quantize_rows`: amax -> scale = amax / 448 -> x / scale rounded to e4m3,
round-to-nearest-even done in fp32 bits so that the store is exact), then `_scaled_mm` with bf16
output and Hopper's fast FP8 accumulation (as vLLM's CUTLASS kernels), then the bias (one add). Why cuBLASLt rather than a Triton FP8 GEMM: its FP8 tensor-core
GEMMs are the fastest we have on Hopper for prefill sizes. A decode row (GEMV_MAX_ROWS) skips the
activation quantization: `fp8_gemv` is parallel/kernels/decode_linear.py's kernel on the e4m3 rows (first
chunk before the PDL wait, widened in registers) with the row scales in its epilogue; 2 ..
SPLITK_MAX_ROWS rows run int8_gemm.py's split-K GEMM on the e4m3 codes (widened to x's dtype in the
main loop, row scales on the accumulator): weight-bound sizes, where quantizing x costs a launch.
CPU is the caller's (dequantize); `_scaled_mm` needs CUDA, the Triton kernels also run under the
interpreter (tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from shardserve.parallel.kernels.decode_linear import GemvTiles, decode_linear
from shardserve.workers.quant.kernels.int8_gemm import gemm_8bit
from shardserve.workers.quant.kernels.splitk import SplitTiles
from shardserve.workers.quant.weights import Fp8Weight

GEMV_MAX_ROWS = 1  # one row: decode_linear's kernel (at 4 rows a GEMV cost ~3x one)
SPLITK_MAX_ROWS = 16  # 2 .. this many rows: W8A16 split-K GEMM; more: W8A8 _scaled_mm

E4M3_MAX = 448.0
MIN_SCALE = 1e-12  # an all-zero row: scale stays finite, codes 0


@dataclass(frozen=True)
class Fp8Packed:
    weight_t: torch.Tensor  # float8_e4m3fn [K, N], column-major (the [N, K] weight transposed, no copy)
    scales: torch.Tensor  # float32 [1, N]

    @property
    def shape(self) -> tuple[int, int]:
        return self.weight_t.shape[1], self.weight_t.shape[0]


def pack_fp8(w: Fp8Weight) -> Fp8Packed:
    if w.q.dtype != torch.float8_e4m3fn or w.q.dim() != 2:
        raise ValueError(f"fp8 weight must be float8_e4m3fn [N, K], got {w.q.dtype} {tuple(w.q.shape)}")
    n, k = w.q.shape
    if tuple(w.scales.shape) != (n,):
        raise ValueError(f"fp8 scales have shape {tuple(w.scales.shape)}, expected ({n},)")
    if k % 16 or n % 16:
        raise ValueError(f"fp8 weight [{n}, {k}]: _scaled_mm needs N and K multiples of 16")
    return Fp8Packed(w.q.contiguous().t(), w.scales.float().view(1, n).contiguous())


@triton.jit
def _round_to_e4m3(v):
    """fp32 v (|v| <= 448) rounded to the nearest e4m3 value, ties to even, still fp32."""
    bits = v.to(tl.int32, bitcast=True)
    # Normal e4m3 (|v| >= 2^-6): keep 3 mantissa bits of 23.
    r = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576  # -1048576 == ~0xFFFFF
    normal = r.to(tl.float32, bitcast=True)
    # Subnormal e4m3: multiples of 2^-9; adding 1.5 * 2^23 rounds v * 512 to an integer (ties to even).
    sub = ((v * 512.0 + 12582912.0) - 12582912.0) * (1.0 / 512.0)
    return tl.where(tl.abs(v) < 0.015625, sub, normal)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_K)
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0) / 448.0, 1e-12)
    tl.store(s_ptr + row, scale)
    q_row = q_ptr + row.to(tl.int64) * stride_qm
    for k0 in range(0, K, BLOCK_K):
        mask = k0 + offs < K
        x = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.minimum(tl.maximum(x / scale, -448.0), 448.0)
        tl.store(q_row + k0 + offs, _round_to_e4m3(v).to(q_ptr.dtype.element_ty), mask=mask)


def quantize_rows(x: torch.Tensor, block_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 codes [M, K], fp32 scales [M, 1]) with x ~= codes * scales, per row."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be [M, K] with a contiguous last dim, got {tuple(x.shape)}")
    rows, k = x.shape
    q = torch.empty(rows, k, dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty(rows, 1, dtype=torch.float32, device=x.device)
    if rows and k:
        block = block_k or min(4096, triton.next_power_of_2(k))
        _quantize_rows_kernel[(rows,)](x, q, scales, k, x.stride(0), q.stride(0), BLOCK_K=block, num_warps=4)
    return q, scales


def fp8_gemv(x: torch.Tensor, packed: Fp8Packed, bias: torch.Tensor | None = None, silu_mul: bool = False,
             tiles: GemvTiles | None = None) -> torch.Tensor:
    """One decode row: x [1, K] (unquantized) @ (e4m3 W * scales)^T + bias: decode_linear's kernel on the e4m3
    rows with the row scales in its epilogue (weights streamed once, fp32 accumulation, one rounding)."""
    return decode_linear(x, packed.weight_t.t(), bias, silu_mul=silu_mul, tiles=tiles, scales=packed.scales.view(-1))


def fp8_linear(x: torch.Tensor, packed: Fp8Packed, bias: torch.Tensor | None = None,
               gemv_max_rows: int = GEMV_MAX_ROWS, splitk_max_rows: int | None = None,
               split_tiles: SplitTiles | None = None) -> torch.Tensor:
    """x [M, K] bf16/fp16 -> x @ W^T + bias [M, N] in x's dtype (W = the Fp8Weight's dequantize()).

    Up to `gemv_max_rows` rows (0: none): `fp8_gemv`; up to `splitk_max_rows` (default SPLITK_MAX_ROWS, read
    at call time; 0: none) or with `split_tiles`: the W8A16 split-K GEMM (x kept in its dtype); more rows
    (CUDA only): per-token e4m3 activations and torch._scaled_mm."""
    n, k = packed.shape
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [M, {k}], got {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"x must be bfloat16 or float16, got {x.dtype}")
    if x.stride(1) != 1:
        x = x.contiguous()
    rows = x.shape[0]
    if rows <= gemv_max_rows and split_tiles is None:
        return fp8_gemv(x, packed, bias)
    if split_tiles is not None or rows <= (SPLITK_MAX_ROWS if splitk_max_rows is None else splitk_max_rows):
        return gemm_8bit(x, packed.weight_t.t(), packed.scales.view(-1), bias, split_tiles)
    q, scales = quantize_rows(x)
    out_dtype = x.dtype if x.dtype == torch.bfloat16 else torch.bfloat16  # rowwise scaling writes bf16
    y = torch._scaled_mm(q, packed.weight_t, scale_a=scales, scale_b=packed.scales, bias=None,
                         out_dtype=out_dtype, use_fast_accum=True)
    if bias is not None:
        y = y + bias.to(out_dtype)
    return y if y.dtype == x.dtype else y.to(x.dtype)

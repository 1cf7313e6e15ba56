"""INT8 weight-only linear (W8A16, per-channel scales) on CUDA: the codes as stored, one kernel a call.

Data flow: an `Int8Weight` (int8 codes [N, K], fp32 scales [N]) is kept as it is (`pack_int8`: the codes
contiguous on the device, the scales fp32): 1 byte a weight, the checkpoint's own layout, so a tensor
parallel shard is a slice. `int8_linear` picks by rows:
  - one row (decode): parallel/kernels/decode_linear.py's GEMV on the codes, widened in registers, the
    row scales in its epilogue (SiLU-and-mul for gate_up too);
  - 2 .. DEQUANT_MIN_ROWS - 1 rows: int8_gemm.py's split-K tensor-core GEMM (tiles: splitk.py);
  - more: W dequantized once a call (`dequantize_int8`) and cuBLAS;
  - except where GEMM_TABLE (the H100 sweep's, `benchmarks/quant_kernels.py --sweep-int8`) holds the
    (row bucket, N, K) of 65 .. 1024 rows: int8_gemm.py's GEMM with its tiles (there it beat both).
fp32 accumulation and one rounding everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from shardserve.parallel.kernels.decode_linear import GemvTiles, decode_linear
from shardserve.workers.quant.kernels import packed as pk
from shardserve.workers.quant.kernels.int8_gemm import dequantize_int8, gemm_8bit
from shardserve.workers.quant.kernels.splitk import SplitTiles
from shardserve.workers.quant.weights import Int8Weight

GEMV_MAX_ROWS = 1  # decode_linear takes one row
GEMM_ROWS = (128, 256, 512, 1024)  # row buckets of GEMM_TABLE (65 .. 1024 rows: a row count takes the next one up)
# (row bucket, N, K) -> int8_gemm.py's tiles, filled from `quant_kernels.py --sweep-int8` (it prints entries only
# where this GEMM beat dequantize + cuBLAS and the split-K default); shapes not here keep the routes above.
GEMM_TABLE: dict[tuple[int, int, int], SplitTiles] = {}


def table_tiles(rows: int, n: int, k: int) -> SplitTiles | None:
    """GEMM_TABLE's tiles for this many rows (65 .. GEMM_ROWS[-1]) at [N, K], or None."""
    if rows <= 64 or rows > GEMM_ROWS[-1]:
        return None
    return GEMM_TABLE.get((next(b for b in GEMM_ROWS if rows <= b), n, k))


@dataclass(frozen=True)
class Int8Packed:
    """The runtime form of one INT8 linear."""

    codes: torch.Tensor  # int8 [N, K], contiguous
    scales: torch.Tensor  # float32 [N]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)


def pack_int8(w: Int8Weight, dtype: torch.dtype) -> Int8Packed:
    """Int8Weight -> Int8Packed for activations of `dtype` (bf16 / fp16), on w's device."""
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"int8 activations must be bfloat16 or float16, got {dtype}")
    if w.q.dtype != torch.int8 or w.q.dim() != 2:
        raise ValueError(f"int8 codes must be an int8 [N, K] tensor, got {w.q.dtype} {tuple(w.q.shape)}")
    n, _ = w.q.shape
    if tuple(w.scales.shape) != (n,):
        raise ValueError(f"int8 scales have shape {tuple(w.scales.shape)}, expected ({n},)")
    return Int8Packed(w.q.contiguous(), w.scales.float().contiguous())


def int8_linear(x: torch.Tensor, packed: Int8Packed, bias: torch.Tensor | None = None,
                gemv_tiles: GemvTiles | None = None, split_tiles: SplitTiles | None = None,
                silu_mul: bool = False, dequant_min_rows: int | None = None) -> torch.Tensor:
    """x [M, K] bf16/fp16 -> x @ W^T + bias [M, N] (W = the Int8Weight's dequantize()). `split_tiles`
    forces the split-K GEMM at any M (else GEMM_TABLE's where it has the shape, unless `dequant_min_rows` is
    given); `silu_mul` (W = [gate; up], one row, no bias): silu(gate) * up."""
    n, k = packed.shape
    pk.check_input(x, k, bias, n)
    if x.stride(1) != 1:
        x = x.contiguous()
    rows = x.shape[0]
    if silu_mul and (rows > GEMV_MAX_ROWS or bias is not None or n % 2):
        raise ValueError(f"silu_mul takes at most {GEMV_MAX_ROWS} rows, no bias and an even N; got {rows} rows, N {n}")
    if rows <= GEMV_MAX_ROWS and split_tiles is None and rows:
        return decode_linear(x, packed.codes, bias, silu_mul=silu_mul, tiles=gemv_tiles, scales=packed.scales)
    interpreted = x.device.type != "cuda"
    if split_tiles is None and dequant_min_rows is None:
        split_tiles = table_tiles(rows, n, k)
    limit = pk.DEQUANT_MIN_ROWS if dequant_min_rows is None else dequant_min_rows  # read at call time
    if rows >= limit and split_tiles is None and not interpreted and n:
        return torch.nn.functional.linear(x, dequantize_int8(packed.codes, packed.scales, x.dtype), bias)
    return gemm_8bit(x, packed.codes, packed.scales, bias, split_tiles)

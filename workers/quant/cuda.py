"""CUDA compute paths for quantized weights: the Triton kernels of kernels/ (and torch._scaled_mm for FP8).

Each kernel module packs the unpacked weight (../weights.py) into its runtime layout once, at
load, and its `*_linear(x, packed, bias)` picks the matrix-vector kernel at decode size and the
GEMM with dequantization in its main loop otherwise; all are CUDA-graph safe. GPTQ 8-bit weights
(asymmetric groups, no kernel of their own) are widened once to the model dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from shardserve.workers.quant.weights import Fp8Weight, GroupedWeight, Int8Weight, QuantizedWeight


def cuda_runtime(w: QuantizedWeight, device: torch.device, dtype: torch.dtype):
    if isinstance(w, GroupedWeight) and w.bits == 4:
        from shardserve.workers.quant.kernels.int4 import int4_linear, pack_int4

        packed = pack_int4(_to(w, device), dtype)
        return lambda x, bias: int4_linear(x, packed, bias)
    if isinstance(w, Int8Weight):
        from shardserve.workers.quant.kernels.int8 import int8_linear, pack_int8

        packed = pack_int8(_to(w, device), dtype)
        return lambda x, bias: int8_linear(x, packed, bias)
    if isinstance(w, Fp8Weight):
        from shardserve.workers.quant.kernels.fp8 import fp8_linear, pack_fp8

        packed = pack_fp8(_to(w, device))
        return lambda x, bias: fp8_linear(x, packed, bias)
    if isinstance(w, GroupedWeight):
        dense = w.dequantize(dtype).to(device)
        return lambda x, bias: F.linear(x, dense, bias)
    raise TypeError(f"no CUDA path for {type(w).__name__}")


def _to(w: QuantizedWeight, device: torch.device) -> QuantizedWeight:
    """The same weight with its tensors on `device`."""
    fields = {name: (value.to(device) if isinstance(value, torch.Tensor) else value)
              for name, value in vars(w).items()}
    return type(w)(**fields)

"""CUDA compute paths for quantized weights: the Triton kernels of kernels/ (and torch._scaled_mm for FP8).

Each kernel module packs the unpacked weight (../weights.py) into its runtime layout once, at
load, and its `*_linear(x, packed, bias)` picks the matrix-vector kernel at decode size and the
GEMM otherwise; all are CUDA-graph safe. INT4 with bf16 activations takes torch's own kernel at
decode rows (kernels/tinygemm.py) where it accepts the shape, the Triton kernels otherwise. A `KernelRuntime` also offers `silu_mul(x)`: at decode
size, gate_up's projection with SiLU-and-mul in the GEMV's epilogue (models/layers.gate_up_silu),
None otherwise. GPTQ 8-bit weights (asymmetric groups, no kernel of their own) are widened once to
the model dtype. GGUF Q4_K / Q6_K run on kernels/kquant.py's exact planes (float32 scales).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from shardserve.workers.quant.kernels.packed import GEMV_MAX_ROWS
from shardserve.workers.quant.weights import Fp8Weight, GroupedWeight, Int8Weight, QuantizedWeight


class KernelRuntime:
    """`linear(x, packed, bias)` of one kernel module over its packed weight; `silu_mul` at decode size."""

    def __init__(self, linear: Callable, packed: object, gemv_rows: int, silu_mul: Callable | None) -> None:
        self.linear, self.packed, self.gemv_rows, self._silu_mul = linear, packed, gemv_rows, silu_mul

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self.linear(x, self.packed, bias)

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor | None:
        """silu(gate) * up for W = [gate; up] in one kernel, or None above the GEMV's rows (or with no
        fused kernel)."""
        if self._silu_mul is None or x.dim() != 2 or x.shape[0] > self.gemv_rows or self.packed.shape[0] % 2:
            return None
        return self._silu_mul(x, self.packed)


KERNEL_DTYPES = (torch.bfloat16, torch.float16)


def cuda_runtime(w: QuantizedWeight, device: torch.device, dtype: torch.dtype):
    widened = isinstance(w, GroupedWeight) and not w.float32_scales and w.bits != 4
    if dtype not in KERNEL_DTYPES and not widened:  # refused at load, before any request
        raise ValueError(f"dtype {str(dtype).removeprefix('torch.')} with weights kept quantized "
                         f"({type(w).__name__}) on CUDA: the quantized CUDA kernels take bfloat16 or float16 "
                         "activations; set dtype to bfloat16 or float16")
    if isinstance(w, GroupedWeight) and w.float32_scales:  # GGUF Q4_K / Q6_K, exact (kernels/kquant.py)
        from shardserve.workers.quant.kernels.int4 import int4_linear
        from shardserve.workers.quant.kernels.kquant import pack_q4k, pack_q6k, q6k_linear

        linear, packed = (int4_linear, pack_q4k(_to(w, device))) if w.bits == 4 else \
            (q6k_linear, pack_q6k(_to(w, device)))
        return KernelRuntime(linear, packed, GEMV_MAX_ROWS, lambda x, p: linear(x, p, silu_mul=True))
    if isinstance(w, GroupedWeight) and w.bits == 4:
        from shardserve.workers.quant.kernels import tinygemm
        from shardserve.workers.quant.kernels.int4 import int4_linear, pack_int4

        if tinygemm.supported(w, device, dtype):  # torch's kernel has no SiLU epilogue
            return KernelRuntime(tinygemm.dual_linear, tinygemm.pack_dual(_to(w, device), dtype), 0, None)

        return KernelRuntime(int4_linear, pack_int4(_to(w, device), dtype), GEMV_MAX_ROWS,
                             lambda x, p: int4_linear(x, p, silu_mul=True))
    if isinstance(w, Int8Weight):
        from shardserve.workers.quant.kernels.int8 import GEMV_MAX_ROWS as INT8_GEMV_ROWS
        from shardserve.workers.quant.kernels.int8 import int8_linear, pack_int8

        return KernelRuntime(int8_linear, pack_int8(_to(w, device), dtype), INT8_GEMV_ROWS,
                             lambda x, p: int8_linear(x, p, silu_mul=True))
    if isinstance(w, Fp8Weight):
        from shardserve.workers.quant.kernels.fp8 import GEMV_MAX_ROWS as FP8_GEMV_ROWS
        from shardserve.workers.quant.kernels.fp8 import fp8_gemv, fp8_linear, pack_fp8

        return KernelRuntime(fp8_linear, pack_fp8(_to(w, device)), FP8_GEMV_ROWS,
                             lambda x, p: fp8_gemv(x, p, silu_mul=True))
    if isinstance(w, GroupedWeight):
        dense = w.dequantize(dtype).to(device)
        return lambda x, bias: F.linear(x, dense, bias)
    raise TypeError(f"no CUDA path for {type(w).__name__}")


def _to(w: QuantizedWeight, device: torch.device) -> QuantizedWeight:
    """The same weight with its tensors on `device`."""
    fields = {name: (value.to(device) if isinstance(value, torch.Tensor) else value)
              for name, value in vars(w).items()}
    return type(w)(**fields)

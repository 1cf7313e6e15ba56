"""CPU compute paths for quantized weights: torch's packed matmuls, weights kept quantized.

  - 4-bit groups: `torch._weight_int4pack_mm_for_cpu` (the tinygemm CPU kernel). It computes
    w = (q - 8) * scale + zero per group, so our w = q * scale + min maps to zero = min + 8 * scale;
    a partial last group is padded (zero columns meet zero activations); act-order permutes x.
  - INT8 per channel: `torch._weight_int8pack_mm`.
  - FP8 and GPTQ 8-bit: no packed CPU matmul exists in torch; FP8 stays stored as e4m3 and is widened
    per call, GPTQ 8-bit is widened once at load (weights hold the quantized values either way).
These ops want float32 activations on CPU, so other dtypes are computed in float32 and cast back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from shardserve.workers.quant.weights import Fp8Weight, GroupedWeight, Int8Weight, QuantizedWeight


class CpuInt4:
    def __init__(self, w: GroupedWeight) -> None:
        n, k = w.q.shape
        if n % 16:
            raise ValueError(f"the CPU int4 kernel needs output features divisible by 16, got {n}")
        g = w.group_size
        self.k, self.k_pad, self.group_size = k, -(-k // g) * g, g
        q = F.pad(w.q.to(torch.int32), (0, self.k_pad - k), value=8)
        self.packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
        zeros = w.mins + 8 * w.scales  # [N, G]
        self.scales_zeros = torch.stack([w.scales.t(), zeros.t()], dim=-1).contiguous()  # [G, N, 2]
        self.perm = w.perm

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        if self.k_pad != self.k:
            x = F.pad(x, (0, self.k_pad - self.k))
        y = torch._weight_int4pack_mm_for_cpu(x.contiguous(), self.packed, self.group_size, self.scales_zeros)
        return _finish(y, bias, dtype)


class CpuInt8:
    def __init__(self, w: Int8Weight) -> None:
        self.q, self.scales = w.q.contiguous(), w.scales.float().contiguous()

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return _finish(torch._weight_int8pack_mm(x.float().contiguous(), self.q, self.scales), bias, x.dtype)


class CpuWidened:
    """FP8: stored e4m3, widened per call. Grouped 8-bit: widened once (`widen_once`)."""

    def __init__(self, w: QuantizedWeight, widen_once: bool) -> None:
        self.w = w
        self.dense = w.dequantize() if widen_once else None

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        dense = self.dense if self.dense is not None else self.w.dequantize()
        return _finish(F.linear(x.float(), dense), bias, x.dtype)


def _finish(y: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype)


def cpu_runtime(w: QuantizedWeight):
    if isinstance(w, GroupedWeight):
        return CpuInt4(w) if w.bits == 4 else CpuWidened(w, widen_once=True)
    if isinstance(w, Int8Weight):
        return CpuInt8(w)
    if isinstance(w, Fp8Weight):
        return CpuWidened(w, widen_once=False)
    raise TypeError(f"no CPU path for {type(w).__name__}")

"""The compressed-tensors layout of 8-bit weights (INT8 and FP8, as llm-compressor writes them).

Per linear layer, N outputs, K inputs:
  weight        int8 or float8_e4m3fn [N, K]
  weight_scale  float [N, 1] (strategy "channel") or [1] (strategy "tensor")
Dequantized: w[n, k] = weight[n, k] * weight_scale[n]. A per-tensor scale is spread over the
layer's output features at load (merged q/k/v then keep one scale each), so every rank holds
per-channel scales. Activations are quantized dynamically per token by the FP8 kernels; folders
with static activation scales are refused by detect.py until static scales are implemented.
"""

from __future__ import annotations

import torch
from shardserve.workers.quant.formats.layout import TensorSpec
from shardserve.workers.quant.weights import Fp8Weight, Int8Weight, QuantizedWeight


class CompressedLayout:
    """kind: "int8" or "fp8"."""

    def __init__(self, kind: str) -> None:
        if kind not in ("int8", "fp8"):
            raise ValueError(f"compressed-tensors kind must be int8 or fp8, got {kind!r}")
        self.name = f"compressed-tensors {kind}"
        self.kind = kind
        self.dtype = torch.int8 if kind == "int8" else torch.float8_e4m3fn

    def tensors(self, input_size: int, output_size: int) -> dict[str, TensorSpec]:
        return {
            "weight": TensorSpec((output_size, input_size), self.dtype, 1, 0),
            "weight_scale": TensorSpec((output_size,), torch.float32, None, 0),
        }

    def unpack(self, tensors: dict[str, torch.Tensor]) -> QuantizedWeight:
        cls = Int8Weight if self.kind == "int8" else Fp8Weight
        return cls(q=tensors["weight"], scales=tensors["weight_scale"].float())

    def pack(self, weight: QuantizedWeight) -> dict[str, torch.Tensor]:
        expected = Int8Weight if self.kind == "int8" else Fp8Weight
        if not isinstance(weight, expected):
            raise TypeError(f"{self.name} packs an {expected.__name__}")
        return {"weight": weight.q, "weight_scale": weight.scales.float()[:, None]}

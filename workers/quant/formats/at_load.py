"""Quantization at load: a float checkpoint's `weight` is read as is, then rounded (RTN) to the method.

This is what `quantization: int8 | int4 | fp8` means for a bf16/fp32 folder, GGUF file or dummy
shape: the layer keeps the checkpoint's float layout while loading (so tensor-parallel slicing is
the plain one) and `unpack` quantizes this rank's slice once every shard has arrived.
"""

from __future__ import annotations

import torch
from shardserve.workers.quant.algorithms.rtn import rtn_fp8, rtn_grouped, rtn_int8
from shardserve.workers.quant.formats.layout import TensorSpec
from shardserve.workers.quant.weights import QuantizedWeight

METHODS = ("int8", "int4", "fp8")


class AtLoadLayout:
    def __init__(self, method: str, params_dtype: torch.dtype, group_size: int = 128, sym: bool = True) -> None:
        if method not in METHODS:
            raise ValueError(f"quantization at load must be one of {METHODS}, got {method!r}")
        self.name = f"{method} (at load)"
        self.method, self.params_dtype, self.group_size, self.sym = method, params_dtype, group_size, sym

    def tensors(self, input_size: int, output_size: int) -> dict[str, TensorSpec]:
        return {"weight": TensorSpec((output_size, input_size), self.params_dtype, 1, 0)}

    def unpack(self, tensors: dict[str, torch.Tensor]) -> QuantizedWeight:
        w = tensors["weight"]
        if self.method == "int8":
            return rtn_int8(w)
        if self.method == "fp8":
            return rtn_fp8(w)
        return rtn_grouped(w, self.group_size, bits=4, sym=self.sym)

    def pack(self, weight: QuantizedWeight) -> dict[str, torch.Tensor]:
        return {"weight": weight.dequantize(self.params_dtype)}

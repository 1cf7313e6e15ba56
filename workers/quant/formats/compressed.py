"""The compressed-tensors layouts (as llm-compressor writes them): naive 8-bit and pack-quantized.

`CompressedLayout` ("int-quantized" / "float-quantized"), per linear layer, N outputs, K inputs:
  weight        int8 or float8_e4m3fn [N, K]
  weight_scale  float [N, 1] (strategy "channel") or [1] (strategy "tensor")
Dequantized: w[n, k] = weight[n, k] * weight_scale[n]. A per-tensor scale is spread over the
layer's output features at load (merged q/k/v then keep one scale each), so every rank holds
per-channel scales. Activations are quantized dynamically per token by the FP8 kernels; folders
with static activation scales are refused by detect.py until static scales are implemented.

`PackQuantizedLayout` ("pack-quantized": INT4 / INT8 weight-only, W4A16 / W8A16), groups of g
(strategy "group") or one group per row ("channel"), G = K / g:
  weight_packed     int32 [N, K * bits / 32]  values + 2**(bits-1) packed along K, low bits first;
  weight_scale      float [N, G];
  weight_zero_point int32 [N * bits / 32, G]  asymmetric only: zero points + 2**(bits-1), packed
                                              along N; symmetric folders have none (zero point 0);
  weight_shape      int64 [2]                 the full [N, K] (read and not needed: the layer knows it).
Dequantized: w[n, k] = (q[n, k] - z[n, k // g]) * scale[n, k // g] with q, z signed — the same
value with both offset by 2**(bits-1), which is ../weights.py's GroupedWeight (mins = -z * scale).
"""

from __future__ import annotations

import torch
from shardserve.workers.quant.formats.layout import TensorSpec, ceil_div, pack_int32, unpack_int32
from shardserve.workers.quant.weights import Fp8Weight, GroupedWeight, Int8Weight, QuantizedWeight


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


class PackQuantizedLayout:
    """bits 4 or 8; group_size g (-1: strategy "channel"); sym: no stored zero points."""

    def __init__(self, bits: int, group_size: int, sym: bool) -> None:
        if bits not in (4, 8):
            raise ValueError(f"compressed-tensors pack-quantized bits must be 4 or 8, got {bits}")
        self.name = f"compressed-tensors pack-quantized int{bits}"
        self.bits, self.group_size, self.sym = bits, group_size, sym
        self.per_word = 32 // bits
        self.offset = 1 << (bits - 1)

    def group_for(self, input_size: int) -> int:
        return input_size if self.group_size == -1 else self.group_size

    def tensors(self, input_size: int, output_size: int) -> dict[str, TensorSpec]:
        g, p = self.group_for(input_size), self.per_word
        if input_size % p or (not self.sym and output_size % p):
            raise ValueError(f"compressed-tensors {self.bits}-bit needs input (and, asymmetric, output) sizes "
                             f"divisible by {p}, got [{output_size}, {input_size}] per rank")
        groups = ceil_div(input_size, g)
        scale_input_dim = None if self.group_size == -1 else 1  # one group per row spans every input
        specs = {
            "weight_packed": TensorSpec((output_size, input_size // p), torch.int32, 1, 0, input_pack=p),
            "weight_scale": TensorSpec((output_size, groups), torch.float32, scale_input_dim, 0, input_pack=g),
            "weight_shape": TensorSpec((2,), torch.int64),
        }
        if not self.sym:
            specs["weight_zero_point"] = TensorSpec((output_size // p, groups), torch.int32, scale_input_dim, 0,
                                                    input_pack=g, output_pack=p)
        return specs

    def unpack(self, tensors: dict[str, torch.Tensor]) -> QuantizedWeight:
        q = unpack_int32(tensors["weight_packed"], self.bits, dim=1)  # [N, K], signed value + offset
        scales = tensors["weight_scale"].float()  # [N, G]
        if self.sym:
            zeros = torch.full_like(scales, float(self.offset))
        else:
            zeros = unpack_int32(tensors["weight_zero_point"], self.bits, dim=0).float()  # [N, G]
        return GroupedWeight(q=q, scales=scales, mins=-zeros * scales, group_size=self.group_for(q.shape[1]),
                             bits=self.bits)

    def pack(self, weight: QuantizedWeight) -> dict[str, torch.Tensor]:
        if not isinstance(weight, GroupedWeight) or weight.bits != self.bits or weight.perm is not None:
            raise TypeError(f"{self.name} packs a {self.bits}-bit GroupedWeight without act-order")
        from shardserve.workers.quant.formats.gptq import zero_points

        packed = {"weight_packed": pack_int32(weight.q, self.bits, dim=1),
                  "weight_scale": weight.scales.float().contiguous(),
                  "weight_shape": torch.tensor(tuple(weight.q.shape), dtype=torch.int64)}
        zeros = zero_points(weight)
        if self.sym:
            if not torch.all(zeros == self.offset):
                raise ValueError(f"{self.name} symmetric needs every zero point at {self.offset}")
        else:
            packed["weight_zero_point"] = pack_int32(zeros, self.bits, dim=0)
        return packed

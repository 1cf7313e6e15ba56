"""The AWQ checkpoint layout (AutoAWQ `version: gemm`, 4 bits, zero point).

Per linear layer, N outputs, K inputs, groups of g (G = K / g):
  qweight int32 [K, N / 8]   values packed along the output dim, nibbles in AWQ's order
                             (word position j holds column 8c + ORDER[j]);
  qzeros  int32 [G, N / 8]   zero points, same packing, stored as they are;
  scales  fp16  [G, N].
Dequantized: w[n, k] = (q[k, n] - z[k // g, n]) * scales[k // g, n].
"""

from __future__ import annotations

import torch
from shardserve.workers.quant.formats.gptq import zero_points
from shardserve.workers.quant.formats.layout import TensorSpec, ceil_div, pack_int32, unpack_int32
from shardserve.workers.quant.weights import GroupedWeight, QuantizedWeight

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


class AwqLayout:
    def __init__(self, bits: int, group_size: int) -> None:
        if bits != 4:
            raise ValueError(f"AWQ bits must be 4, got {bits}")
        self.name = "awq"
        self.bits, self.group_size = bits, group_size

    def group_for(self, input_size: int) -> int:
        return input_size if self.group_size == -1 else self.group_size

    def tensors(self, input_size: int, output_size: int) -> dict[str, TensorSpec]:
        g = self.group_for(input_size)
        if output_size % 8:
            raise ValueError(f"AWQ needs output sizes divisible by 8, got {output_size} per rank")
        groups = ceil_div(input_size, g)
        return {
            "qweight": TensorSpec((input_size, output_size // 8), torch.int32, 0, 1, output_pack=8),
            "qzeros": TensorSpec((groups, output_size // 8), torch.int32, 0, 1, input_pack=g, output_pack=8),
            "scales": TensorSpec((groups, output_size), torch.float16, 0, 1, input_pack=g),
        }

    def unpack(self, tensors: dict[str, torch.Tensor]) -> QuantizedWeight:
        q = unpack_int32(tensors["qweight"], 4, dim=1, order=ORDER).t()  # [N, K]
        zeros = unpack_int32(tensors["qzeros"], 4, dim=1, order=ORDER).float()  # [G, N]
        scales = tensors["scales"].float()
        return GroupedWeight(q=q.contiguous(), scales=scales.t().contiguous(),
                             mins=(-zeros * scales).t().contiguous(), group_size=self.group_for(q.shape[1]))

    def pack(self, weight: QuantizedWeight) -> dict[str, torch.Tensor]:
        if not isinstance(weight, GroupedWeight) or weight.bits != 4 or weight.perm is not None:
            raise TypeError("AWQ packs a 4-bit GroupedWeight without act-order")
        return {
            "qweight": pack_int32(weight.q.t(), 4, dim=1, order=ORDER),
            "qzeros": pack_int32(zero_points(weight).t(), 4, dim=1, order=ORDER),
            "scales": weight.scales.t().to(torch.float16).contiguous(),
        }

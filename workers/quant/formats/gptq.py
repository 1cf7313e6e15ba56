"""The GPTQ checkpoint layout (AutoGPTQ / GPTQModel, `checkpoint_format: gptq`), 4 or 8 bits.

Per linear layer, for a weight of N outputs and K inputs with groups of g (G = ceil(K / g)):
  qweight int32 [K * bits / 32, N]   values packed along the input dim, low bits first;
  qzeros  int32 [G, N * bits / 32]   zero points packed along the output dim, stored minus one
                                     (the v1 convention; `gptq_v2` stores them as they are);
  scales  fp16  [G, N];
  g_idx   int32 [K]                  the group of each input feature (act-order: not k // g).
Dequantized: w[n, k] = (q[k, n] - z[g_idx[k], n]) * scales[g_idx[k], n]. Act-order folders are
unpacked with their input columns sorted by group (`perm`), so groups are contiguous for the kernels.
"""

from __future__ import annotations

import torch
from shardserve.workers.quant.formats.layout import TensorSpec, ceil_div, pack_int32, unpack_int32
from shardserve.workers.quant.weights import GroupedWeight, QuantizedWeight


class GptqLayout:
    """bits 4 or 8; group_size g (-1: one group over all inputs); v2: zeros stored without the -1."""

    def __init__(self, bits: int, group_size: int, desc_act: bool = False, v2: bool = False) -> None:
        if bits not in (4, 8):
            raise ValueError(f"GPTQ bits must be 4 or 8, got {bits}")
        self.name = "gptq"
        self.bits, self.group_size, self.desc_act, self.v2 = bits, group_size, desc_act, v2
        self.per_word = 32 // bits

    def group_for(self, input_size: int) -> int:
        return input_size if self.group_size == -1 else self.group_size

    def tensors(self, input_size: int, output_size: int) -> dict[str, TensorSpec]:
        g, p = self.group_for(input_size), self.per_word
        groups = ceil_div(input_size, g)
        if input_size % p or output_size % p:
            raise ValueError(f"GPTQ {self.bits}-bit needs input and output sizes divisible by {p}, "
                             f"got [{output_size}, {input_size}] per rank")
        # Act-order: any input feature may use any group, so a rank keeps every group's row.
        scale_input_dim = None if self.desc_act else 0
        return {
            "qweight": TensorSpec((input_size // p, output_size), torch.int32, 0, 1, input_pack=p),
            "qzeros": TensorSpec((groups, output_size // p), torch.int32, scale_input_dim, 1,
                                 input_pack=g, output_pack=p),
            "scales": TensorSpec((groups, output_size), torch.float16, scale_input_dim, 1, input_pack=g),
            "g_idx": TensorSpec((input_size,), torch.int32, 0, None),
        }

    def unpack(self, tensors: dict[str, torch.Tensor]) -> QuantizedWeight:
        q = unpack_int32(tensors["qweight"], self.bits, dim=0).t()  # [N, K]
        zeros = unpack_int32(tensors["qzeros"], self.bits, dim=1).to(torch.int32)  # [G, N]
        if not self.v2:
            zeros = (zeros + 1) & ((1 << self.bits) - 1)
        scales = tensors["scales"].float()  # [G, N]
        k = q.shape[1]
        g = self.group_for(k)
        g_idx = tensors["g_idx"].to(torch.int64)
        if not self.desc_act:  # a row-parallel rank's slice starts at its first group, as its scales do
            g_idx = g_idx - g_idx.min()
        perm = None
        columns = torch.arange(k, device=g_idx.device)
        if not torch.equal(g_idx, columns // g):
            perm = torch.argsort(g_idx, stable=True)
            q = q[:, perm]
            # act-order: groups of g consecutive sorted columns; each group must hold exactly g features
            sorted_groups = g_idx[perm]
            if not torch.equal(sorted_groups, columns // g):
                raise ValueError("GPTQ g_idx does not give every group exactly group_size inputs on this rank "
                                 "(act-order checkpoints need tensor_parallel_size 1 for row-parallel layers)")
        groups = ceil_div(k, g)
        scales, zeros = scales[:groups], zeros[:groups]
        return GroupedWeight(q=q.contiguous(), scales=scales.t().contiguous(),
                             mins=(-zeros.float() * scales).t().contiguous(), group_size=g, perm=perm,
                             bits=self.bits)

    def pack(self, weight: QuantizedWeight) -> dict[str, torch.Tensor]:
        if not isinstance(weight, GroupedWeight) or weight.bits != self.bits:
            raise TypeError(f"GPTQ {self.bits}-bit packs a GroupedWeight of {self.bits} bits")
        n, k = weight.q.shape
        zeros = zero_points(weight)  # [N, G]
        q = weight.q
        g_idx = torch.arange(k, dtype=torch.int32, device=q.device) // weight.group_size
        if weight.perm is not None:  # back to the checkpoint's input order
            q = torch.empty_like(q).index_copy_(1, weight.perm, q)
            g_idx = torch.empty_like(g_idx).index_copy_(0, weight.perm, g_idx)
        stored = zeros if self.v2 else (zeros - 1) & ((1 << self.bits) - 1)
        return {
            "qweight": pack_int32(q.t(), self.bits, dim=0),
            "qzeros": pack_int32(stored.t(), self.bits, dim=1),
            "scales": weight.scales.t().to(torch.float16).contiguous(),
            "g_idx": g_idx,
        }


def zero_points(weight: GroupedWeight) -> torch.Tensor:
    """Integer zero points z with mins = -z * scales; an error if the mins are not of that form."""
    safe = torch.where(weight.scales == 0, torch.ones_like(weight.scales), weight.scales)
    z = torch.round(-weight.mins / safe)
    if not torch.allclose(-z * weight.scales, weight.mins, rtol=1e-3, atol=1e-6):
        raise ValueError("this weight has float minimums (e.g. GGUF Q4_1), which GPTQ/AWQ cannot store")
    return z.clamp(0, (1 << weight.bits) - 1).to(torch.int32)

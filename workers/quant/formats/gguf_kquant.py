"""GGUF k-quant projections (Q4_K, Q6_K) kept packed: super-blocks split into grouped fields, exactly.

llama.cpp's k-quants hold 256 weights a super-block with an fp16 scale d (and, for Q4_K, an fp16 dmin):
  - Q4_K: 8 sub-blocks of 32 with 6-bit sc and m (packed in 12 bytes), 4-bit q: w = d*sc * q - dmin*m;
  - Q6_K: 16 sub-blocks of 16 with int8 sc, 6-bit q (4 low bits in ql, 2 high in qh): w = d*sc * (q - 32).
`split_q4_k` / `split_q6_k` (gguf_kblocks.py) fold d into each sub-block's scale in float32 (d*sc and dmin*m are exact
products there: 11 x 6 or 8 significant bits), so the grouped form w = q * scale + min gives gguf-py's
`dequantize` bit for bit: Q4_K as 4-bit codes in groups of 32 (scale d*sc, min -dmin*m, each one
float32: fp16 cannot hold d*sc), Q6_K as 6-bit codes in groups of 16 (scale d*sc, min -32*scale).
A Q4_K_M file mixes both in one merged layer (q/k Q4_K, v Q6_K), so `GgufKLayout` loads every
projection as the same four tensors whatever its type — codes, scales per 16 inputs, mins per 32,
and a per-row `kind` (4 or 6) — and `unpack` cuts the rows into one GroupedWeight per block type
(a StackedWeight when the layer mixes them). Tensor-parallel slices take whole 32-input sub-blocks.
Other k-quants (Q2_K, Q3_K, Q5_K) take the dequantized path (workers/models/gguf.py).
"""

from __future__ import annotations

import torch
from shardserve.workers.quant.formats.gguf import GgufLayout
from shardserve.workers.quant.formats.layout import TensorSpec
from shardserve.workers.quant.weights import GroupedWeight, QuantizedWeight, StackedWeight


class GgufKLayout(GgufLayout):
    """Q4_K / Q6_K projections: q uint8 [N, K], scales float32 [N, K/32, 2], mins [N, K/32], kind uint8 [N]."""

    def __init__(self, block_types: str) -> None:
        super().__init__(4 if "Q4_K" in block_types else 6, block_types)

    def tensors(self, input_size: int, output_size: int) -> dict[str, TensorSpec]:
        if input_size % 32:
            raise ValueError(f"GGUF {self.name[5:]} weights need input features in whole 32-input sub-blocks "
                             f"per tensor-parallel rank, got {input_size}")
        blocks = input_size // 32
        return {"q": TensorSpec((output_size, input_size), torch.uint8, 1, 0),
                "scales": TensorSpec((output_size, blocks, 2), torch.float32, 1, 0, input_pack=32),
                "mins": TensorSpec((output_size, blocks), torch.float32, 1, 0, input_pack=32),
                "kind": TensorSpec((output_size,), torch.uint8, None, 0)}

    def unpack(self, tensors: dict[str, torch.Tensor]) -> QuantizedWeight | StackedWeight:
        kind = tensors["kind"]
        edges = [0, *((kind[1:] != kind[:-1]).nonzero().flatten() + 1).tolist(), kind.shape[0]]  # runs of one type
        parts = [_part(tensors, start, end, int(kind[start])) for start, end in zip(edges, edges[1:], strict=False)]
        return parts[0] if len(parts) == 1 else StackedWeight(parts)


def _part(tensors: dict[str, torch.Tensor], start: int, end: int, bits: int) -> GroupedWeight:
    q = tensors["q"][start:end].contiguous()
    pairs = tensors["scales"][start:end]
    if bits == 4:
        return GroupedWeight(q=q, scales=pairs[..., 0].contiguous(), mins=tensors["mins"][start:end].contiguous(),
                             group_size=32, bits=4, float32_scales=True)
    if bits == 6:
        scales = pairs.reshape(end - start, -1).contiguous()
        return GroupedWeight(q=q, scales=scales, mins=-32 * scales, group_size=16, bits=6, float32_scales=True)
    raise ValueError(f"GGUF k-quant rows {start}..{end - 1} have no block type ({bits}): their tensor was not loaded")

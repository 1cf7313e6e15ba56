"""A GGUF token table (token_embd / output, [vocab, hidden]) kept in its blocks for the CPU kernels.

`pack_table(raw rows, block type)` splits the blocks as the projections' readers do (gguf.py's
`split_blocks` for Q8_0 / Q4_0 / Q4_1, gguf_kblocks.py for Q4_K / Q6_K) and packs them once into the
CPU kernels' forms: Q8_0 -> PackedQ8, Q4_0 / Q4_1 -> PackedQ4 (fp16 scale and min: exact for both),
Q4_K -> PackedQ4 with float32 scales, Q6_K -> PackedQ8G16. Every form dequantizes to gguf-py's
`dequantize` bit for bit. The resulting `PackedTable` gives
  - `rows(ids)`: float32 [T, hidden], only the looked-up rows dequantized (the embedding);
  - `linear(x)`: float32 [T, vocab] = x @ table.T through the projections' row kernels (the LM head),
    float or int8 activations as the projections (ModelConfig.cpu_activations); from DENSE_FROM_ROWS float
    rows the kernels' dense path (the table dequantized block by block into a scratch, one GEMM a block).
Other block types (F16, F32, Q5_K ...) return None: the caller keeps the float table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from shardserve.workers.quant.cpu_kernels import q4_linear, q8_linear
from shardserve.workers.quant.cpu_kernels.kquant import PackedQ8G16, kquant_linear, pack_q4f, pack_q8g16
from shardserve.workers.quant.cpu_kernels.packing import PackedQ4, PackedQ8, pack_q4, pack_q8
from shardserve.workers.quant.formats.gguf import split_blocks
from shardserve.workers.quant.formats.gguf_kblocks import split_q4_k, split_q6_k
from shardserve.workers.quant.weights import GroupedWeight

TABLE_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")


@dataclass(frozen=True)
class PackedTable:
    block_type: str
    packed: PackedQ4 | PackedQ8 | PackedQ8G16

    @property
    def num_rows(self) -> int:
        return self.packed.n

    @property
    def nbytes(self) -> int:
        tensors = [getattr(self.packed, f) for f in ("qs", "dm", "d", "mins") if hasattr(self.packed, f)]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """ids int [T] -> float32 [T, hidden]."""
        return self.packed.dequantize_rows(ids)

    def linear(self, x: torch.Tensor, int8_activations: bool = False) -> torch.Tensor:
        """x [T, hidden] -> float32 [T, num_rows]."""
        x = x.float()
        if isinstance(self.packed, PackedQ8):
            return q8_linear(x, self.packed, int8_activations=int8_activations)
        if self.block_type in ("Q4_0", "Q4_1"):
            return q4_linear(x, self.packed, int8_activations=int8_activations)
        return kquant_linear(x, self.packed, int8_activations=int8_activations)


def pack_table(raw: np.ndarray, block_type: str) -> PackedTable | None:
    """Raw block rows [vocab, bytes per row] of a `block_type` tensor -> its PackedTable, or None."""
    if block_type in ("Q8_0", "Q4_0", "Q4_1"):
        q, scales, mins = split_blocks(raw, block_type)
        bits = 8 if block_type == "Q8_0" else 4
        weight = GroupedWeight(q=q, scales=scales, mins=mins, group_size=32, bits=bits)
        return PackedTable(block_type, pack_q8(weight) if bits == 8 else pack_q4(weight))
    if block_type == "Q4_K":
        q, scales, mins = split_q4_k(raw)
        weight = GroupedWeight(q=q, scales=scales, mins=mins, group_size=32, bits=4, float32_scales=True)
        return PackedTable(block_type, pack_q4f(weight))
    if block_type == "Q6_K":
        q, scales = split_q6_k(raw)
        weight = GroupedWeight(q=q, scales=scales, mins=-32 * scales, group_size=16, bits=6, float32_scales=True)
        return PackedTable(block_type, pack_q8g16(weight))
    return None

"""GGUF k-quant projections (Q4_K, Q6_K) kept packed: super-blocks split into grouped fields, exactly.

llama.cpp's k-quants hold 256 weights a super-block with an fp16 scale d (and, for Q4_K, an fp16 dmin):
  - Q4_K: 8 sub-blocks of 32 with 6-bit sc and m (packed in 12 bytes), 4-bit q: w = d*sc * q - dmin*m;
  - Q6_K: 16 sub-blocks of 16 with int8 sc, 6-bit q (4 low bits in ql, 2 high in qh): w = d*sc * (q - 32).
`split_q4_k` / `split_q6_k` fold d into each sub-block's scale in float32 (d*sc and dmin*m are exact
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

import numpy as np
import torch
from shardserve.workers.quant.formats.gguf import GgufLayout
from shardserve.workers.quant.formats.layout import TensorSpec
from shardserve.workers.quant.weights import GroupedWeight, QuantizedWeight, StackedWeight

SUPER = 256
KQUANT_BITS = {"Q4_K": 4, "Q6_K": 6}  # block type -> code bits (the per-row `kind`)
_BYTES = {"Q4_K": 144, "Q6_K": 210}


def _blocks(raw: np.ndarray, block_type: str) -> np.ndarray:
    n = raw.shape[0]
    if raw.shape[1] % _BYTES[block_type]:
        raise ValueError(f"{block_type} rows must be whole {_BYTES[block_type]}-byte super-blocks, "
                         f"got {raw.shape[1]} bytes")
    return raw.reshape(n, -1, _BYTES[block_type])


def split_q4_k(raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K rows [N, K / 256 * 144] -> (q uint8 [N, K] 0..15, scales, mins float32 [N, K / 32])."""
    blocks = _blocks(raw, "Q4_K")
    n, nb = blocks.shape[:2]
    d = blocks[..., 0:2].copy().view(np.float16).astype(np.float32)  # [N, nb, 1]
    dmin = blocks[..., 2:4].copy().view(np.float16).astype(np.float32)
    s = blocks[..., 4:16].reshape(n, nb, 3, 4)  # 6-bit sc / m of 8 sub-blocks (gguf-py's get_scale_min)
    lo, mid, hi = s[..., 0, :], s[..., 1, :], s[..., 2, :]
    sc = np.concatenate([lo & 0x3F, (hi & 0x0F) | ((lo >> 2) & 0x30)], axis=-1)  # [N, nb, 8]
    m = np.concatenate([mid & 0x3F, (hi >> 4) | ((mid >> 2) & 0x30)], axis=-1)
    scales = d * sc.astype(np.float32)
    mins = -(dmin * m.astype(np.float32))  # q * scale + (-dm) == gguf-py's d * q - dm, bit for bit
    qs = blocks[..., 16:].reshape(n, nb, 4, 1, 32)  # 4 chunks of 32 bytes: low nibbles sub-block 2c, high 2c+1
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-2)  # [N, nb, 4, 2, 32]
    return (torch.from_numpy(q.reshape(n, nb * SUPER).copy()), torch.from_numpy(scales.reshape(n, nb * 8)),
            torch.from_numpy(mins.reshape(n, nb * 8)))


def split_q6_k(raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Q6_K rows [N, K / 256 * 210] -> (q uint8 [N, K] 0..63, scales float32 [N, K / 16]): w = scale * (q - 32)."""
    blocks = _blocks(raw, "Q6_K")
    n, nb = blocks.shape[:2]
    ql = blocks[..., 0:128].reshape(n, nb, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 1, 2, 1)
    ql = (ql & 0x0F).reshape(n, nb, 8, 32)
    qh = blocks[..., 128:192].reshape(n, nb, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 1, 4, 1)
    qh = (qh & 0x03).reshape(n, nb, 8, 32)
    sc = blocks[..., 192:208].copy().view(np.int8).astype(np.float32)  # [N, nb, 16]
    d = blocks[..., 208:210].copy().view(np.float16).astype(np.float32)  # [N, nb, 1]
    q = (ql | (qh << 4)).reshape(n, nb * SUPER)
    return torch.from_numpy(np.ascontiguousarray(q)), torch.from_numpy((d * sc).reshape(n, nb * 16))


def split_kquant(raw: np.ndarray, block_type: str) -> dict[str, torch.Tensor]:
    """The four GgufKLayout fields of one projection's rows: q, scales [N, K/32, 2], mins [N, K/32], kind [N]."""
    n = raw.shape[0]
    if block_type == "Q4_K":
        q, scales, mins = split_q4_k(raw)
        pairs = torch.stack([scales, scales], dim=-1)  # both 16-input halves of a 32 sub-block share it
    elif block_type == "Q6_K":
        q, scales16 = split_q6_k(raw)
        pairs = scales16.view(n, -1, 2)
        mins = torch.zeros(n, pairs.shape[1], dtype=torch.float32)
    else:
        raise ValueError(f"{block_type} is not a k-quant kept packed ({', '.join(KQUANT_BITS)})")
    kind = torch.full((n,), KQUANT_BITS[block_type], dtype=torch.uint8)
    return {"q": q, "scales": pairs.contiguous(), "mins": mins, "kind": kind}


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

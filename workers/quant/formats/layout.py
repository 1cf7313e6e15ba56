"""What a checkpoint layout is: the tensors of one quantized linear layer and how to (un)pack them.

A layout (gptq.py, awq.py, compressed.py, float_at_load.py) answers three questions for one linear
layer of this rank: which tensors the checkpoint holds for it (`tensors`: names, per-rank shapes,
dtypes, and which dims hold the input / output features and how many features one stored element
covers, so the tensor-parallel loader can slice packed tensors), how to turn the loaded tensors
into the unpacked form of ../weights.py (`unpack`), and the reverse (`pack`, used by
`shardserve quantize` to write folders other engines can load).

Integers are packed into int32 words low bits first; `pack_int32` / `unpack_int32` do it along a
dimension, with an optional order of the values inside a word (AWQ interleaves nibbles).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from shardserve.workers.quant.weights import QuantizedWeight


@dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor of a layer, as this rank holds it.

    input_dim / output_dim: the tensor dims of the input / output features (None: not sliced).
    input_pack / output_pack: features covered by one element along that dim (8 for 4-bit values
      packed in int32, group_size for per-group scales, 1 otherwise).
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    input_dim: int | None = None
    output_dim: int | None = None
    input_pack: int = 1
    output_pack: int = 1


class CheckpointLayout(Protocol):
    name: str

    def tensors(self, input_size: int, output_size: int) -> dict[str, TensorSpec]:
        """The layer's checkpoint tensors (names relative to the layer) for a [output, input] weight."""
        ...

    def unpack(self, tensors: dict[str, torch.Tensor]) -> QuantizedWeight:
        ...

    def pack(self, weight: QuantizedWeight) -> dict[str, torch.Tensor]:
        ...


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def pack_int32(values: torch.Tensor, bits: int, dim: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Pack unsigned `bits`-wide integers along `dim` into int32 words (value i at bits i * bits).

    order: position j of a word holds the value `order[j]` of its group of 32 // bits values.
    """
    per_word = 32 // bits
    v = values.to(torch.int64).movedim(dim, -1)
    if v.shape[-1] % per_word:
        raise ValueError(f"cannot pack {v.shape[-1]} values into int32 words of {per_word}")
    v = v.reshape(*v.shape[:-1], -1, per_word)
    if order is not None:
        v = v[..., list(order)]
    shifts = torch.arange(per_word, dtype=torch.int64, device=v.device) * bits
    words = (v << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as signed int32
    return words.to(torch.int32).movedim(-1, dim).contiguous()


def unpack_int32(words: torch.Tensor, bits: int, dim: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Inverse of `pack_int32`: int32 words -> uint8 values (bits <= 8), `dim` grows by 32 // bits."""
    per_word = 32 // bits
    w = words.to(torch.int64).movedim(dim, -1) & 0xFFFFFFFF
    shifts = torch.arange(per_word, dtype=torch.int64, device=w.device) * bits
    v = (w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [..., words, per_word], word position order
    if order is not None:
        v = v[..., [order.index(j) for j in range(per_word)]]
    v = v.reshape(*v.shape[:-2], -1)
    return v.to(torch.uint8).movedim(-1, dim).contiguous()

"""The unpacked form every quantized weight passes through: checkpoint readers produce it, kernels pack it.

A checkpoint format (GPTQ, AWQ, compressed-tensors, GGUF, or quantization at load) is read
into one of these dataclasses for this rank's slice of the layer; each compute path (the
Triton kernels on CUDA, torch's packed CPU matmuls) then packs it into its own runtime
layout once, at load. Nothing in the forward pass sees these objects.

Conventions (N = output features, K = input features, G = ceil(K / group_size): a last, partial
group is allowed, as GPTQ writes for e.g. K = 576 with groups of 128):
  - `GroupedWeight` (INT4, GPTQ 8-bit): w[n, k] = q[n, k] * scales[n, k // g] + mins[n, k // g]. Integer zero points
    (GPTQ, AWQ: w = (q - z) * s) become mins = -z * s; GGUF Q4_1's float minimum maps as is.
    Act-order checkpoints (GPTQ `g_idx`) are stored with their input columns sorted by group,
    and `perm` says which input feature each column is: y = x[:, perm] @ w.T.
  - `Int8Weight`: symmetric per output channel, w[n, k] = q[n, k] * scales[n].
  - `Fp8Weight`: e4m3 values, w[n, k] = q[n, k] * scales[n] (per-tensor: one value repeated).
  - `StackedWeight`: row blocks of one merged layer in different forms (GGUF Q4_K_M's qkv).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GroupedWeight:
    """q: uint8 [N, K] in 0..2**bits - 1; scales, mins: float32 [N, G]; perm: int64 [K] or None.

    bits is 4 for most methods; GPTQ's 8-bit layout reuses this form with bits = 8, GGUF Q6_K with bits = 6."""

    q: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor
    group_size: int
    perm: torch.Tensor | None = None
    bits: int = 4
    float32_scales: bool = False  # packed forms keep scales / mins in float32 (GGUF k-quants: fp16 cannot hold d*sc)

    def __post_init__(self) -> None:
        n, k = self.q.shape
        if self.group_size <= 0:
            raise ValueError(f"group_size must be positive, got {self.group_size}")
        groups = -(-k // self.group_size)
        for name in ("scales", "mins"):
            shape = tuple(getattr(self, name).shape)
            if shape != (n, groups):
                raise ValueError(f"grouped {name} has shape {shape}, expected {(n, groups)} "
                                 f"for a [{n}, {k}] weight with group_size {self.group_size}")
        if self.perm is not None and tuple(self.perm.shape) != (k,):
            raise ValueError(f"grouped perm has shape {tuple(self.perm.shape)}, expected ({k},)")

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """w [N, K] in the checkpoint's input order (perm undone)."""
        k = self.q.shape[1]
        scales = self.scales.repeat_interleave(self.group_size, dim=1)[:, :k]
        mins = self.mins.repeat_interleave(self.group_size, dim=1)[:, :k]
        w = self.q.float() * scales + mins
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(1, self.perm, w)
        return w.to(dtype)


@dataclass
class ChannelWeight:
    """q [N, K] (int8 or e4m3, see the subclasses); scales: float32 [N]."""

    q: torch.Tensor
    scales: torch.Tensor

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.q.float() * self.scales[:, None]).to(dtype)


@dataclass
class Int8Weight(ChannelWeight):
    """q: int8 [N, K]."""


@dataclass
class Fp8Weight(ChannelWeight):
    """q: float8_e4m3fn [N, K]."""


QuantizedWeight = GroupedWeight | Int8Weight | Fp8Weight


@dataclass
class StackedWeight:
    """Row blocks of one merged layer quantized differently (a GGUF Q4_K_M qkv: q and k Q4_K, v Q6_K):
    W = cat(parts) along the output features; each part gets its own compute path (method.runtime_for)."""

    parts: list[QuantizedWeight]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.cat([p.dequantize(dtype) for p in self.parts], dim=0)


def narrow_inputs(w: QuantizedWeight, start: int, size: int) -> QuantizedWeight:
    """Input features [start, start + size) of a weight (a row-parallel rank's slice of a weight
    quantized whole, so its scales are the ones a single process computes)."""
    if isinstance(w, GroupedWeight):
        g = w.group_size
        if start % g or (size % g and start + size != w.q.shape[1]) or w.perm is not None:
            raise ValueError(f"cannot give a tensor-parallel rank inputs [{start}, {start + size}) of a weight "
                             f"with groups of {g}: the slice must hold whole groups")
        groups = slice(start // g, -(-(start + size) // g))
        return GroupedWeight(q=w.q[:, start:start + size].contiguous(), scales=w.scales[:, groups].contiguous(),
                             mins=w.mins[:, groups].contiguous(), group_size=g, bits=w.bits,
                             float32_scales=w.float32_scales)
    return type(w)(q=w.q[:, start:start + size].contiguous(), scales=w.scales)


Int4Weight = GroupedWeight  # the name the kernels and algorithms use for the 4-bit case

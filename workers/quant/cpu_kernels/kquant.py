"""CPU runtimes for GGUF k-quant weights kept packed and exact (kquant.cpp): pack once, then one call a step.

  - Q4_K: packing.py's `PackedQ4` (kernels.cpp's q4 nibble order) with scale and min float32 per group of
    32 — the q4 layout's fp16 cannot hold d*sc (measured on random blocks: ~20 % of Q4_K scales are
    fp16-exact), so w = q * scale + min reproduces gguf-py's `dequantize` bit for bit only in fp32.
    0.5 + 8 / 32 = 0.75 bytes a weight.
  - `PackedQ8G16` (Q6_K): int8 codes q - 32 and a float32 scale d*sc per 16 inputs: w = q * d, exact
    (|q| <= 32 times an 18-bit scale fits fp32's 24 bits). 1 + 4 / 16 = 1.25 bytes a weight.
Both with float activations (results equal `dequantize()` + F.linear up to summation order) or int8
activations (ModelConfig.cpu_activations); from `DENSE_FROM_ROWS` rows with float activations the weight
is dequantized block by block by kernels.cpp (`dense_linear`), as for Q4 / Q8. The extension builds on first use
(build.py); a failed build raises `CpuKernelsUnavailable` and cpu.py widens the weight instead.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import ModuleType

import torch
from shardserve.workers.quant.cpu_kernels import DENSE_FROM_ROWS, _bias, _flat, _shaped, dense_linear
from shardserve.workers.quant.cpu_kernels.build import HERE, build, extension
from shardserve.workers.quant.cpu_kernels.packing import PackedQ4
from shardserve.workers.quant.weights import GroupedWeight

EXTENSION_NAME = "shardserve_quant_kquant_v1"


@functools.cache
def kquant_extension() -> ModuleType:
    return build(HERE / "kquant.cpp", EXTENSION_NAME)


@dataclass(frozen=True)
class PackedQ8G16:
    qs: torch.Tensor  # int8 [N, K]
    d: torch.Tensor  # float32 [N, K/16]
    n: int
    k: int

    def dequantize(self) -> torch.Tensor:
        return (self.qs.float().view(self.n, -1, 16) * self.d[:, :, None]).view(self.n, self.k)

    def dequantize_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """float32 [len(ids), K]: rows of w (an embedding kept packed looks up only its tokens' rows)."""
        return (self.qs[ids].float().view(len(ids), -1, 16) * self.d[ids][:, :, None]).view(len(ids), self.k)

    def dequantize_into(self, r0: int, r1: int, out: torch.Tensor) -> None:
        """Rows r0..r1 of w into `out` (float32 [r1 - r0, K]): kernels.cpp's q8 with a scale per 16, no mins."""
        extension().q8_dequantize(self.qs, self.d, None, 16, out, r0, r1)


def pack_q4f(w: GroupedWeight) -> PackedQ4:
    n, k = w.q.shape
    if w.bits != 4 or w.group_size % 32 or k % w.group_size:
        raise ValueError(f"pack_q4f takes 4-bit weights in groups of a multiple of 32 dividing K, got bits={w.bits}, "
                         f"group_size {w.group_size}, K {k}")
    q = w.q.view(n, k // 32, 2, 16)
    qs = (q[:, :, 0, :] | (q[:, :, 1, :] << 4)).reshape(n, k // 2).contiguous()
    dm = torch.stack([w.scales, w.mins], dim=-1).float().contiguous()
    return PackedQ4(qs, dm, w.group_size, n, k)  # float32 dm: kquant.cpp, not kernels.cpp


def pack_q8g16(w: GroupedWeight) -> PackedQ8G16:
    """A symmetric 6-bit weight in groups of 16 (GGUF Q6_K: w = q * s - 32 s) -> int8 q - 32, scale s."""
    n, k = w.q.shape
    if w.bits != 6 or w.group_size != 16 or k % 32:
        raise ValueError(f"pack_q8g16 takes 6-bit weights in groups of 16 with K a multiple of 32, got bits={w.bits}, "
                         f"group_size {w.group_size}, K {k}")
    if not torch.equal(w.mins, -32 * w.scales):
        raise ValueError("pack_q8g16 takes symmetric 6-bit groups (min = -32 * scale, GGUF Q6_K)")
    qs = (w.q.to(torch.int16) - 32).to(torch.int8).contiguous()
    return PackedQ8G16(qs, w.scales.float().contiguous(), n, k)


class KquantRuntime:
    """y = runtime(x, bias) over a float32-scaled PackedQ4 or a PackedQ8G16."""

    def __init__(self, w: GroupedWeight) -> None:
        if w.perm is not None:
            raise ValueError("GGUF k-quant weights have no act-order permutation")
        self.packed: PackedQ4 | PackedQ8G16 = pack_q4f(w) if w.bits == 4 else pack_q8g16(w)
        self.int8_activations = False  # ModelConfig.cpu_activations, set by runner/cpu_activations.py

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return kquant_linear(x, self.packed, bias, int8_activations=self.int8_activations)


def kquant_linear(x: torch.Tensor, packed: PackedQ4 | PackedQ8G16, bias: torch.Tensor | None = None,
                  isa: str = "", int8_activations: bool = False) -> torch.Tensor:
    """y [..., N] = x [..., K] @ w.T + bias; `isa` forces a variant ('avx2' or 'scalar', for tests)."""
    x2, lead = _flat(x, packed.k)
    if x2.shape[0] >= DENSE_FROM_ROWS and not int8_activations:  # prefill: the kernels' blockwise dense path
        return _shaped(dense_linear(x2, packed, bias), lead, x.dtype)
    ext = kquant_extension()
    if isinstance(packed, PackedQ4):
        y = ext.q4f_linear(x2, packed.qs, packed.dm, packed.group_size, _bias(bias), isa, int8_activations)
    else:
        y = ext.q8g16_linear(x2, packed.qs, packed.d, _bias(bias), isa, int8_activations)
    return _shaped(y, lead, x.dtype)

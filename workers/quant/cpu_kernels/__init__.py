"""CPU matmuls for weights kept quantized: pack once at load, then `q4_linear` / `q8_linear` per call.

`pack_q4(GroupedWeight)` and `pack_q8(Int8Weight | 8-bit GroupedWeight)` turn the unpacked forms of
`workers/quant/weights.py` into the layouts of kernels.cpp (4-bit: GGUF Q4_1-style nibbles with fp16
scale and min per group; 8-bit: int8 with float32 scale, and min, per group). By default the quantized values are
widened to float in registers and met by float activations (AVX2 + FMA), so results equal
`w.dequantize()` + F.linear up to summation order (greedy tokens unchanged). With
`int8_activations=True` each call instead quantizes x to int8 per 32 inputs and sums integer dot
products (AVX2 maddubs; AVX512-VNNI dpbusd on 512-bit vectors, 8-row tiles: wide512.inc), the way llama.cpp
does: fewer instructions, extra rows (a verify step's) cheap, but results move by the activation rounding. The extension is built on first use (build.py); if that fails,
`CpuKernelsUnavailable` is raised and the caller keeps torch's ops.

From `DENSE_FROM_ROWS` rows of x on (prefill), with float activations, the weight is dequantized for the call
(block by block of rows into a per-thread scratch of DENSE_BLOCK floats, by the extension) and fp32 GEMMs run
instead: the row loop re-does the widening per row.

Act-order weights (`perm` set) are packed in their stored column order: the caller passes
`x[..., perm]`, as `workers/quant/cpu.py` does for torch's int4 kernel.
"""

from __future__ import annotations

import threading
from typing import Protocol

import torch
import torch.nn.functional as F
from shardserve.workers.quant.cpu_kernels.build import CpuKernelsUnavailable, extension
from shardserve.workers.quant.cpu_kernels.packing import PackedQ4, PackedQ8, pack_q4, pack_q8

__all__ = ["CpuKernelsUnavailable", "PackedQ4", "PackedQ8", "best_isa", "pack_q4", "pack_q8", "q4_linear",
           "q8_linear"]


DENSE_FROM_ROWS = 16


class RowsDequantizable(Protocol):
    """A packed weight [n, k] that writes rows r0..r1 of its float32 form into a buffer (dense_linear)."""

    n: int
    k: int

    def dequantize_into(self, r0: int, r1: int, out: torch.Tensor) -> None: ...

DENSE_BLOCK = 1 << 22  # float32 elements of W dequantized at a time (16 MB): the scratch a thread keeps
_SCRATCH: dict[int, torch.Tensor] = {}


def best_isa() -> str:
    """'avx512vnni', 'avx2' or 'scalar': the instruction set the kernels use on this CPU."""
    return extension().best_isa()


def q4_linear(x: torch.Tensor, packed: PackedQ4, bias: torch.Tensor | None = None, isa: str = "",
              int8_activations: bool = False) -> torch.Tensor:
    """y [..., N] = x [..., K] @ w.T + bias, w the packed 4-bit weight; `isa` forces a variant (tests)."""
    x2, lead = _flat(x, packed.k)
    if x2.shape[0] >= DENSE_FROM_ROWS and not int8_activations:
        return _shaped(dense_linear(x2, packed, bias), lead, x.dtype)
    y = extension().q4_linear(x2, packed.qs, packed.dm, packed.group_size, _bias(bias), isa, int8_activations)
    return _shaped(y, lead, x.dtype)


def q8_linear(x: torch.Tensor, packed: PackedQ8, bias: torch.Tensor | None = None, isa: str = "",
              int8_activations: bool = False) -> torch.Tensor:
    """y [..., N] = x [..., K] @ w.T + bias, w the packed 8-bit weight; `isa` forces a variant (tests)."""
    x2, lead = _flat(x, packed.k)
    if x2.shape[0] >= DENSE_FROM_ROWS and not int8_activations:
        return _shaped(dense_linear(x2, packed, bias), lead, x.dtype)
    y = extension().q8_linear(x2, packed.qs, packed.d, packed.mins, packed.group_size, _bias(bias), isa,
                              int8_activations)
    return _shaped(y, lead, x.dtype)


def dense_linear(x2: torch.Tensor, packed: RowsDequantizable, bias: torch.Tensor | None) -> torch.Tensor:
    """y [M, N] float32 = x2 @ W^T + bias, W [N, K] dequantized block by block of rows into this thread's
    scratch (`packed.dequantize_into(r0, r1, out)`), each block one GEMM: no W-sized temporaries a call."""
    n, k = packed.n, packed.k
    per = max(1, min(n, DENSE_BLOCK // k))
    scratch = _scratch(per * k)
    if per == n:
        w = scratch[: n * k].view(n, k)
        packed.dequantize_into(0, n, w)
        return F.linear(x2, w, _bias(bias))
    yt = torch.empty(n, x2.shape[0], dtype=torch.float32)  # y transposed: each block is a run of rows
    for r0 in range(0, n, per):
        r1 = min(n, r0 + per)
        w = scratch[: (r1 - r0) * k].view(r1 - r0, k)
        packed.dequantize_into(r0, r1, w)
        torch.mm(w, x2.t(), out=yt[r0:r1])
    y = yt.t().contiguous()
    return y if bias is None else y.add_(_bias(bias))


def _scratch(numel: int) -> torch.Tensor:
    """This thread's float32 scratch of at least `numel` elements (grown, never shrunk)."""
    buf = _SCRATCH.get(threading.get_ident())
    if buf is None or buf.numel() < numel:
        buf = _SCRATCH[threading.get_ident()] = torch.empty(numel, dtype=torch.float32)
    return buf


def _flat(x: torch.Tensor, k: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input features, the weight has {k}")
    if x.dim() == 2 and x.dtype == torch.float32 and x.is_contiguous():
        return x, (x.shape[0],)  # the decode case: no reshape / cast / copy calls (each costs ~1-2 us of dispatch)
    return x.reshape(-1, k).float().contiguous(), tuple(x.shape[:-1])


def _shaped(y: torch.Tensor, lead: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """y [M, N] float32 back to x's leading dims and dtype (no call where x was [M, K] float32)."""
    if len(lead) != 1:
        y = y.reshape(*lead, y.shape[-1])
    return y if dtype == torch.float32 else y.to(dtype)


def _bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None else bias.float().contiguous()

"""Packs the unpacked quantized forms (weights.py) into the layouts kernels.cpp reads.

  - `PackedQ4`: qs uint8 [N, K/2], per 32 inputs 16 bytes with byte j = q[j] | q[j + 16] << 4
    (GGUF Q4_1's nibble order); dm float16 [N, G, 2] = (scale, min) per group (exact for GGUF and
    GPTQ/AWQ's float16 scales; a float32 min = -z * scale is rounded to float16, ~5e-4 relative).
  - `PackedQ8`: qs int8 [N, K]; d float32 [N, G]; mins float32 [N, G] or None.
    Int8Weight (per channel) is one group spanning K; an 8-bit GroupedWeight (q in 0..255) is
    re-centred to q - 128 with min + 128 * scale; GGUF Q8_0 blocks come in through `from_blocks`.
The kernels need K and the group size to be multiples of 32 and whole groups (no partial last group).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from shardserve.workers.quant.cpu_kernels.build import extension
from shardserve.workers.quant.weights import GroupedWeight, Int8Weight

FP16_MAX = 65504.0


@dataclass(frozen=True)
class PackedQ4:
    qs: torch.Tensor  # uint8 [N, K/2]
    dm: torch.Tensor  # float16 [N, G, 2] (kernels.cpp); float32 for GGUF Q4_K (kquant.py, kquant.cpp)
    group_size: int
    n: int
    k: int

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K] (for many rows at once, where one dense matmul beats a row loop)."""
        return self._rows(self.qs, self.dm)

    def dequantize_into(self, r0: int, r1: int, out: torch.Tensor) -> None:
        """Rows r0..r1 of w into `out` (float32 [r1 - r0, K]) in one pass (kernels.cpp, float16 or float32 dm)."""
        extension().q4_dequantize(self.qs, self.dm, self.group_size, out, r0, r1)

    def dequantize_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """float32 [len(ids), K]: rows of w (an embedding kept packed looks up only its tokens' rows)."""
        return self._rows(self.qs[ids], self.dm[ids])

    def _rows(self, qs: torch.Tensor, dm: torch.Tensor) -> torch.Tensor:
        blocks = qs.view(qs.shape[0], self.k // 32, 16)
        q = torch.cat([blocks & 0x0F, blocks >> 4], dim=-1).view(qs.shape[0], -1, self.group_size).float()
        dm = dm.float()  # [T, G, 2]
        return (q * dm[:, :, 0:1] + dm[:, :, 1:2]).view(qs.shape[0], self.k)


@dataclass(frozen=True)
class PackedQ8:
    qs: torch.Tensor  # int8 [N, K]
    d: torch.Tensor  # float32 [N, G]
    mins: torch.Tensor | None  # float32 [N, G]
    group_size: int
    n: int
    k: int

    @staticmethod
    def from_blocks(q: torch.Tensor, scales: torch.Tensor, group_size: int = 32) -> PackedQ8:
        """Symmetric blocks, e.g. GGUF Q8_0: q int8 [N, K], scales [N, K / group_size]."""
        n, k = q.shape
        _check_geometry(k, group_size, "int8")
        if q.dtype != torch.int8 or tuple(scales.shape) != (n, k // group_size):
            raise ValueError(f"Q8 blocks need q int8 [N, K] and scales [N, K / {group_size}], got q {q.dtype} "
                             f"{tuple(q.shape)} and scales {tuple(scales.shape)}")
        return PackedQ8(q.contiguous(), scales.float().contiguous(), None, group_size, n, k)

    @staticmethod
    def from_exact_float(w: torch.Tensor, group_size: int = 32) -> PackedQ8 | None:
        """The symmetric 8-bit blocks a float32 [N, K] weight already is, or None where it is not.

        A GGUF Q8_0 tensor read back as float (the tied SmolLM2 embedding) holds q * d per block,
        |q| <= 127 with the largest 127 and d a float16: d is recovered as max|w| / 127 and
        q = w / d, and the result is kept only if q * d gives back every value exactly (lossless)."""
        n, k = w.shape
        if w.dtype != torch.float32 or k % group_size or group_size % 32:
            return None
        blocks = w.reshape(n, k // group_size, group_size)
        d = blocks.abs().amax(dim=-1) / 127.0  # [N, G]
        if not torch.equal(d.half().float(), d):
            return None
        q = torch.where(d[:, :, None] > 0, blocks / d.clamp_min(torch.finfo(torch.float32).tiny)[:, :, None],
                        0.0).round()
        if q.abs().max() > 127 or not torch.equal(q * d[:, :, None], blocks):
            return None
        return PackedQ8.from_blocks(q.to(torch.int8).reshape(n, k), d, group_size)

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K]."""
        return self.dequantize_rows(torch.arange(self.n))

    def dequantize_into(self, r0: int, r1: int, out: torch.Tensor) -> None:
        """Rows r0..r1 of w into `out` (float32 [r1 - r0, K]) in one pass (kernels.cpp)."""
        extension().q8_dequantize(self.qs, self.d, self.mins, self.group_size, out, r0, r1)

    def dequantize_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """float32 [len(ids), K]: rows of w (a tied embedding looked up from the LM head's weight)."""
        rows = self.qs[ids].float().view(len(ids), -1, self.group_size)  # [T, G, group]
        w = rows * self.d[ids][:, :, None]
        if self.mins is not None:
            w = w + self.mins[ids][:, :, None]
        return w.view(len(ids), self.k)


def _check_geometry(k: int, group_size: int, what: str) -> None:
    if group_size % 32 or k % group_size:
        raise ValueError(f"the CPU {what} kernels need group_size a multiple of 32 and input features a multiple "
                         f"of group_size (no partial last group), got group_size {group_size} and K {k}")


def pack_q4(w: GroupedWeight) -> PackedQ4:
    if w.bits != 4:
        raise ValueError(f"pack_q4 takes 4-bit grouped weights, got bits={w.bits}")
    n, k = w.q.shape
    _check_geometry(k, w.group_size, "int4")
    for name in ("scales", "mins"):
        t = getattr(w, name)
        if not torch.isfinite(t).all() or t.abs().max() > FP16_MAX:
            raise ValueError(f"grouped {name} must be finite and within float16 range for the CPU int4 kernel")
    q = w.q.view(n, k // 32, 2, 16)  # per block: elements 0..15 go to the low nibbles, 16..31 to the high
    qs = (q[:, :, 0, :] | (q[:, :, 1, :] << 4)).reshape(n, k // 2).contiguous()
    dm = torch.stack([w.scales, w.mins], dim=-1).to(torch.float16).contiguous()
    return PackedQ4(qs, dm, w.group_size, n, k)


def pack_q8(w: Int8Weight | GroupedWeight) -> PackedQ8:
    if isinstance(w, Int8Weight):
        n, k = w.q.shape
        _check_geometry(k, k, "int8")
        return PackedQ8(w.q.contiguous(), w.scales.float().reshape(n, 1).contiguous(), None, k, n, k)
    if isinstance(w, GroupedWeight) and w.bits == 8:
        n, k = w.q.shape
        _check_geometry(k, w.group_size, "int8")
        qs = (w.q.to(torch.int16) - 128).to(torch.int8).contiguous()
        mins = (w.mins + 128 * w.scales).float().contiguous()
        return PackedQ8(qs, w.scales.float().contiguous(), None if not mins.any() else mins, w.group_size, n, k)
    raise TypeError(f"pack_q8 takes an Int8Weight or an 8-bit GroupedWeight, got {type(w).__name__}"
                    + (f" with bits={w.bits}" if isinstance(w, GroupedWeight) else ""))

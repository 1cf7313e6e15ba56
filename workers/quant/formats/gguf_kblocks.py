"""llama.cpp's k-quant super-blocks (Q4_K, Q6_K) split into grouped fields, exactly (no torch model code).

`split_q4_k` / `split_q6_k` fold each super-block's fp16 d into its sub-blocks' scales in float32
(d*sc and dmin*m are exact products there), so w = q * scale + min equals gguf-py's `dequantize` bit
for bit; `split_kquant` gives the four fields GgufKLayout (gguf_kquant.py) loads. Kept apart from
gguf_kquant.py so gguf.py's reader can use it without an import cycle.
"""

from __future__ import annotations

import numpy as np
import torch

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

"""Random INT4 weights for the quantized-kernel tests (test_quant_kernels.py, test_splitk.py)."""

from __future__ import annotations

import torch
from shardserve.workers.quant.weights import Int4Weight


def random_int4(n: int, k: int, group: int, symmetric: bool, act_order: bool, device) -> Int4Weight:
    """Codes, scales of 0.005-0.025 and (asymmetric) mins in [-16 s, 0]; a random column order with act_order."""
    g = k // group
    scales = torch.rand(n, g, device=device) * 0.02 + 0.005
    mins = -8 * scales if symmetric else -torch.rand(n, g, device=device) * 16 * scales
    perm = torch.randperm(k, device=device) if act_order else None
    return Int4Weight(torch.randint(0, 16, (n, k), dtype=torch.uint8, device=device), scales, mins, group, perm)

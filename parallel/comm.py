"""Collectives over the tensor-parallel group: the only torch.distributed calls of a forward pass.

Row-parallel layers and the vocab-parallel embedding sum their partial results with
`tensor_model_parallel_all_reduce`; the LM head concatenates its vocab shards with
`tensor_model_parallel_all_gather`. Both read the group from `get_parallel_state()` and are
the identity when the tensor-parallel size is 1 (no torch.distributed needed).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from shardserve.parallel.state import get_parallel_state


def tensor_model_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the TP group in place and return it; identity at TP size 1."""
    tp = get_parallel_state().tp
    if tp.size == 1:
        return x
    dist.all_reduce(x, group=tp.group)
    return x


def tensor_model_parallel_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate every TP rank's `x` along `dim` (rank order); identity at TP size 1."""
    tp = get_parallel_state().tp
    if tp.size == 1:
        return x
    dim = dim % x.dim()
    gathered = torch.empty((tp.size, *x.shape), dtype=x.dtype, device=x.device)  # [tp_size, *x.shape]
    dist.all_gather_into_tensor(gathered, x.contiguous(), group=tp.group)
    return torch.cat(gathered.unbind(0), dim=dim)

"""The TP all-reduce fused with the residual add and RMSNorm after it, on the custom all-reduce's buffer.

Why: every row-parallel layer's sum feeds straight into `rmsnorm(sum + residual)`; one kernel
that pushes this rank's partial rows to every peer, waits for the peers' rows and reduces,
adds and normalises replaces PyTorch's two-barrier one-shot all-reduce plus the norm kernel
(parallel/kernels/allreduce_rmsnorm.py has both protocols). The default is `lamport` (the data
is its own flag); `parallel.fused_allreduce_protocol: flags` selects the flag protocol. Figures
for both protocols, per call and end to end: benchmarks/README.md.

Memory: it lives in the same symmetric buffer as `CustomAllReduce` (one allocation, one
rendezvous), after the `max_bytes` PyTorch's ops use:
    [0, max_bytes)                      PyTorch's symm_mem ops (custom_allreduce.py)
    [max_bytes, + FLAG_BYTES)           flags: NUM_PROGRAMS x W int64, zeroed before the rendezvous
    [.. , + 2 * half_bytes)             data: two parity halves of W x max_rows x hidden elements
PyTorch's ops keep their own signal pads, so the two never share a word. With Lamport the flags
go unused and the data area holds three rotating buffers that start as a sentinel; the default
6 MiB halves (`parallel.fused_allreduce_norm_bytes`) hold 256 rows of 4,096 bf16 at TP 2.
Selection (`FusedAllReduceNorm.fits`) depends only on shapes and dtype, identical on every rank
of a TP step; `parallel.fused_allreduce_norm: false` turns it off for A/B runs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from shardserve.parallel.options import KernelOptions

# The kernel module is imported inside the functions that use it: the kernel tests re-import
# kernel modules under Triton's interpreter, and names bound here at import time would keep the
# compiled versions.
logger = logging.getLogger(__name__)

DEFAULT_PROTOCOL = KernelOptions.fused_allreduce_protocol  # lamport: faster at every row count both hold (1-64)
DEFAULT_HALF_BYTES = KernelOptions.fused_allreduce_norm_bytes  # lamport: 256 rows of 4,096 bf16 at TP 2 (flags: 384)
FLAG_BYTES = 4096  # room for NUM_PROGRAMS (32) x 16 ranks of int64 flags
FUSED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def half_bytes_for(options: KernelOptions) -> int:
    """Bytes of one parity half (0: no fused area); a multiple of 16."""
    if not options.fused_allreduce_norm:
        return 0
    return -(-max(0, options.fused_allreduce_norm_bytes) // 16) * 16


def protocol_for(options: KernelOptions) -> str:
    """The kernel protocol the options name (a ValueError for one the kernel lacks)."""
    from shardserve.parallel.kernels.allreduce_rmsnorm import PROTOCOLS

    if options.fused_allreduce_protocol not in PROTOCOLS:
        raise ValueError(f"fused_allreduce_protocol must be one of {', '.join(PROTOCOLS)}, "
                         f"got {options.fused_allreduce_protocol!r}")
    return options.fused_allreduce_protocol


def prepare_area(area: torch.Tensor, protocol: str) -> None:
    """Put this rank's fresh fused area (uint8, FLAG_BYTES + 2 * half_bytes) in its starting state:
    flags zeroed (flags), every data slot the "not yet written" sentinel (lamport)."""
    from shardserve.parallel.kernels.allreduce_rmsnorm import SENTINEL_32

    area[:FLAG_BYTES].zero_()
    if protocol == "lamport":
        area[FLAG_BYTES:].view(torch.int32).fill_(SENTINEL_32)


def area_bytes(half_bytes: int) -> int:
    """Bytes the fused area adds to the symmetric buffer (0 when off)."""
    return 0 if half_bytes == 0 else FLAG_BYTES + 2 * half_bytes


def fused_reason(*, device_type: str, dtype: torch.dtype, shape: Sequence[int], last_stride: int,
                 has_residual: bool, residual_shape: Sequence[int] | None, half_bytes: int,
                 world_size: int, protocol: str = DEFAULT_PROTOCOL) -> str | None:
    """Why this call cannot take the fused kernel (None: it can). Pure: a function of shapes only."""
    from shardserve.parallel.kernels.allreduce_rmsnorm import rows_capacity

    if device_type != "cuda":
        return "not a CUDA tensor"
    if dtype not in FUSED_DTYPES:
        return f"dtype {dtype} unsupported"
    if len(shape) != 2 or last_stride != 1:
        return "not [tokens, hidden] with a contiguous last dim"
    if not has_residual or residual_shape is None or tuple(residual_shape) != tuple(shape):
        return "no residual of the same shape"
    num_tokens, hidden = shape
    if num_tokens == 0:
        return "empty"
    capacity = rows_capacity(half_bytes, world_size, hidden, dtype.itemsize, protocol)
    if num_tokens > capacity:
        return f"{num_tokens} rows over the {capacity}-row buffer"
    return None


class FusedAllReduceNorm:
    """The fused kernel bound to one TP group's symmetric buffer.

    buffer_ptrs: every rank's base address of the symmetric buffer (the rendezvous handle's
    `buffer_ptrs`, mapped into this process); offset: where the fused area starts in it.
    """

    def __init__(self, buffer_ptrs: Sequence[int], offset: int, half_bytes: int, rank: int,
                 device: torch.device, protocol: str = DEFAULT_PROTOCOL) -> None:
        from shardserve.parallel.kernels.allreduce_rmsnorm import NUM_COUNTERS, NUM_PROGRAMS

        self.rank, self.world_size, self.half_bytes, self.protocol = rank, len(buffer_ptrs), half_bytes, protocol
        if any((p + offset) % 16 for p in buffer_ptrs) or half_bytes % 16:
            raise ValueError("the fused area must start 16-byte aligned on every rank (the kernel's "
                             "vector loads and stores assume it)")
        if self.world_size * NUM_PROGRAMS * 8 > FLAG_BYTES:
            raise ValueError(f"{self.world_size} ranks need more than {FLAG_BYTES} bytes of flags")
        self.flag_ptrs = torch.tensor([p + offset for p in buffer_ptrs], dtype=torch.int64, device=device)
        self.data_ptrs = torch.tensor([p + offset + FLAG_BYTES for p in buffer_ptrs], dtype=torch.int64,
                                      device=device)
        self.counters = torch.zeros(NUM_COUNTERS, dtype=torch.int64, device=device)

    def fits(self, x: torch.Tensor, residual: torch.Tensor | None) -> bool:
        return fused_reason(device_type=x.device.type, dtype=x.dtype, shape=tuple(x.shape),
                            last_stride=x.stride(-1) if x.dim() else 0, has_residual=residual is not None,
                            residual_shape=None if residual is None else tuple(residual.shape),
                            half_bytes=self.half_bytes, world_size=self.world_size, protocol=self.protocol) is None

    def __call__(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(rmsnorm(sum_ranks(x) + residual) * weight, sum_ranks(x) + residual); x must `fit`."""
        from shardserve.parallel.kernels.allreduce_rmsnorm import allreduce_rmsnorm

        return allreduce_rmsnorm(x, residual, weight, eps, rank=self.rank, world_size=self.world_size,
                                 data_ptrs=self.data_ptrs, flag_ptrs=self.flag_ptrs, counters=self.counters,
                                 half_bytes=self.half_bytes, protocol=self.protocol)

    def self_test(self) -> str | None:
        """Fused result vs all-reduce-then-`rmsnorm` on integers exact in bf16 (None: all match).

        Eager, with host syncs: setup only, every rank of the group together."""
        from shardserve.parallel.kernels.rmsnorm import rmsnorm

        device, w = self.counters.device, self.world_size
        for num_tokens, hidden in ((1, 4096), (3, 576), (40, 1024)):  # 40 rows: 2 per program
            base = (torch.arange(num_tokens * hidden, device=device) % 7).view(num_tokens, hidden)
            x = (base + self.rank).to(torch.bfloat16)
            residual = (base % 3).to(torch.bfloat16)
            weight = torch.linspace(0.5, 1.5, hidden, device=device).to(torch.bfloat16)
            if not self.fits(x, residual):
                continue
            out, new_residual = self(x, residual, weight, 1e-6)
            total = (base * w + w * (w - 1) // 2).to(torch.bfloat16)
            ref_out, ref_residual = rmsnorm(total, weight, 1e-6, residual)
            if not (torch.equal(out, ref_out) and torch.equal(new_residual, ref_residual)):
                return f"fused all-reduce + RMSNorm self-test mismatch ({num_tokens} x {hidden})"
        return None

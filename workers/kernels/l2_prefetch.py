"""L2 prefetch of the next GEMM's weights, overlapped with the kernel before it (experimental).

Why: at TP 4 a batch-1 decode step spends clearly longer in GEMMs than their weight bytes take at
copy bandwidth (ramp-up and tail weigh a lot), while the fused all-reduce + RMSNorm before them
runs on 32 SMs waiting on NVLink and HBM idles. This kernel, launched right after that one with
programmatic dependent launch (parallel/kernels/pdl.py), runs on the free SMs meanwhile and
issues `prefetch.global.L2` for the next GEMM's weights (up to a byte cap: what HBM can deliver
in the window and L2 holds), so the GEMM reads them from L2. It stays off
(`parallel.l2_prefetch_mb: 0`) until measured; a side-stream load that was tried is in
benchmarks/README.md, "Tried and dropped".

Protocol exception: pdl.py's kernels wait for the previous kernel before touching memory. This
one reads nothing; it only hints addresses of weights, which no kernel writes while serving. It
waits at its end, so it completes after the previous kernel, and the GEMM (launched without
PDL, after it in the stream) starts after both, as before.

Data flow: up to two regions `(address, bytes)` (e.g. the qkv and o_proj weights), cut to 128-byte
lines; program p of G prefetches lines p*BLOCK, (p+G)*BLOCK, ... of each region. Without PDL the
kernel could not overlap anything, so `l2_prefetch` launches nothing then (CPU included).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from shardserve.parallel.kernels.pdl import pdl_options, release_next, wait_for_previous
from shardserve.parallel.options import KernelOptions, kernel_options

LINE_BYTES = 128
BLOCK = 512  # lines per program per iteration (4 per thread at 4 warps)
MAX_PROGRAMS = 64  # leaves most SMs to the kernel being overlapped (the fused all-reduce uses 32)


@triton.jit
def _prefetch_lines(base, num_lines, pid, num_programs, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    for start in range(pid * BLOCK, num_lines, num_programs * BLOCK):
        line = tl.minimum(start + offs, num_lines - 1).to(tl.int64)  # the tail repeats the last line
        addr = base + line * 128
        tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [addr], dtype=tl.int32,
                                  is_pure=False, pack=1)


@triton.jit
def _l2_prefetch_kernel(base0, lines0, base1, lines1, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    release_next(USE_PDL)
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    _prefetch_lines(base0, lines0, pid, num_programs, BLOCK)
    _prefetch_lines(base1, lines1, pid, num_programs, BLOCK)
    wait_for_previous(USE_PDL)  # complete only after the kernel this one overlaps


def prefetch_cap(options: KernelOptions | None = None) -> int:
    """Bytes to prefetch per call: KernelOptions.l2_prefetch_mb (0: off, the default until measured)."""
    return max(0, int((options or kernel_options()).l2_prefetch_mb * 2**20))


def plan_regions(tensors: Sequence[torch.Tensor], max_bytes: int) -> list[tuple[int, int]]:
    """(address, 128-byte lines) of up to two tensors' storage, in order, cut to `max_bytes` in all."""
    if len(tensors) > 2:
        raise ValueError(f"at most two regions per launch, got {len(tensors)}")
    regions, left = [], max(0, max_bytes)
    for t in tensors:
        if not t.is_contiguous():
            raise ValueError(f"a prefetched tensor must be contiguous, got strides {t.stride()}")
        num_bytes = min(t.numel() * t.element_size(), left)
        if num_bytes > 0:
            regions.append((t.data_ptr(), triton.cdiv(num_bytes, LINE_BYTES)))
            left -= num_bytes
    return regions


def l2_prefetch(tensors: Sequence[torch.Tensor], max_bytes: int) -> bool:
    """Hint the first `max_bytes` of `tensors` into L2, overlapped with the previous kernel;
    returns whether a kernel was launched (only on a device with PDL; see the module docstring)."""
    if not tensors or not tensors[0].is_cuda:
        return False
    options = pdl_options(tensors[0].device)
    regions = plan_regions(tensors, max_bytes)
    if not options["USE_PDL"] or not regions:
        return False
    (base0, lines0), (base1, lines1) = (regions + [(regions[0][0], 0)])[:2]
    num_programs = max(1, min(MAX_PROGRAMS, triton.cdiv(lines0 + lines1, BLOCK)))
    _l2_prefetch_kernel[(num_programs,)](base0, lines0, base1, lines1, BLOCK=BLOCK, num_warps=4, **options)
    return True

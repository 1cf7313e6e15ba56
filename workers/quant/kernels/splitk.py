"""Split-K for the weight-streaming GEMMs (codes_gemm.py INT4 planes, int8_gemm.py INT8 codes): tiles, reduce.

Why: at 2-128 rows a GEMM of [M, BLOCK_M] x [N, BLOCK_N] tiles has only N / BLOCK_N programs (o_proj at
64 x 64: 64 programs on 132 SMs), each streaming all of K; the weights are a quarter (INT4) or half
(INT8) of bf16's bytes, so the kernel is memory-bound and must keep every SM streaming. Split-K adds
a third grid axis: program (m tile, n tile, split s) sums the K steps [s * per, (s + 1) * per) (whole
chunks / word blocks, so every split sees whole groups), in fp32.
Data flow: `launch_split` sizes the grid; with one split the kernel adds the bias and stores x's dtype
into `out` directly; with more it writes fp32 partials into a [splits, M, N] buffer (torch.empty inside
the call: the caching allocator keeps that CUDA-graph safe, no host sync) and `_reduce_kernel` sums
them in a fixed order (deterministic, unlike atomics), adds the bias and rounds once. Both kernels
follow parallel/kernels/pdl.py's protocol (wait, then release, first): with PDL the reduce is
scheduled while the GEMM's last programs run and its launch latency hides behind them.
`default_split_tiles` picks tiles by (bits, rows, N, K): the H100 sweep's table (`SPLIT_TABLE`, filled
from `benchmarks/quant_kernels.py --sweep-splitk`) where it has the shape, else a heuristic: about two
waves of programs, at least MIN_STEPS K steps a split.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from shardserve.parallel.kernels.pdl import pdl_options, release_next, wait_for_previous


@dataclass(frozen=True)
class SplitTiles:
    block_m: int
    block_n: int
    split_k: int  # K splits asked for (fewer run when K has fewer steps: no split is empty)
    num_warps: int
    num_stages: int


SM_COUNT = 132  # H100 SXM / H200: the heuristic's wave size where the device is not known
MIN_STEPS = 4  # K steps (INT4 chunks of 8 planes, INT8 blocks of 128 columns) a split at least
MAX_SPLIT = 8
SWEEP_ROWS = (2, 4, 8, 16, 32, 64, 128, 256)  # the row buckets of SPLIT_TABLE (a row count takes the next one up)
# (bits, row bucket, N, K) -> tiles: the best of the H100 sweep (`quant_kernels.py --sweep-splitk`, its
# printed table pasted here; timings in benchmarks/README.md) at the Llama-3.1-8B shapes; others: the heuristic.
# The 32-row bucket takes the 64-row tiles: a 64-row tile reads the same weights, and the sweep's 64-row
# layers (INT4 207.7, INT8 165.1 us) beat its best 32-row tiles (294.7, 181.4).
SPLIT_TABLE: dict[tuple[int, int, int, int], SplitTiles] = {
    (4, 2, 6144, 4096): SplitTiles(16, 64, 4, 4, 3),
    (4, 2, 4096, 4096): SplitTiles(16, 128, 8, 4, 4),
    (4, 2, 28672, 4096): SplitTiles(16, 128, 1, 4, 3),
    (4, 2, 4096, 14336): SplitTiles(16, 128, 8, 4, 3),
    (4, 4, 6144, 4096): SplitTiles(16, 64, 4, 4, 3),
    (4, 4, 4096, 4096): SplitTiles(16, 128, 8, 4, 3),
    (4, 4, 28672, 4096): SplitTiles(16, 128, 1, 4, 3),
    (4, 4, 4096, 14336): SplitTiles(16, 128, 8, 4, 3),
    (4, 8, 6144, 4096): SplitTiles(16, 64, 4, 4, 3),
    (4, 8, 4096, 4096): SplitTiles(16, 128, 8, 4, 4),
    (4, 8, 28672, 4096): SplitTiles(16, 128, 1, 4, 3),
    (4, 8, 4096, 14336): SplitTiles(16, 128, 8, 4, 3),
    (4, 16, 6144, 4096): SplitTiles(16, 64, 4, 4, 3),
    (4, 16, 4096, 4096): SplitTiles(16, 64, 4, 4, 3),
    (4, 16, 28672, 4096): SplitTiles(16, 128, 1, 4, 3),
    (4, 16, 4096, 14336): SplitTiles(16, 128, 8, 4, 3),
    (4, 32, 6144, 4096): SplitTiles(64, 64, 2, 4, 3),
    (4, 32, 4096, 4096): SplitTiles(64, 64, 4, 4, 3),
    (4, 32, 28672, 4096): SplitTiles(64, 64, 1, 4, 3),
    (4, 32, 4096, 14336): SplitTiles(64, 64, 4, 4, 3),
    (4, 64, 6144, 4096): SplitTiles(64, 64, 2, 4, 3),
    (4, 64, 4096, 4096): SplitTiles(64, 64, 4, 4, 3),
    (4, 64, 28672, 4096): SplitTiles(64, 64, 1, 4, 3),
    (4, 64, 4096, 14336): SplitTiles(64, 64, 4, 4, 3),
    (4, 128, 6144, 4096): SplitTiles(64, 64, 2, 4, 3),
    (4, 128, 4096, 4096): SplitTiles(64, 64, 2, 4, 3),
    (4, 128, 28672, 4096): SplitTiles(128, 128, 1, 8, 3),
    (4, 128, 4096, 14336): SplitTiles(128, 128, 4, 8, 2),
    (4, 256, 6144, 4096): SplitTiles(128, 128, 1, 8, 3),
    (4, 256, 4096, 4096): SplitTiles(64, 64, 1, 4, 3),
    (4, 256, 28672, 4096): SplitTiles(128, 128, 1, 8, 3),
    (4, 256, 4096, 14336): SplitTiles(128, 128, 2, 8, 2),
    (8, 2, 6144, 4096): SplitTiles(16, 128, 8, 4, 3),
    (8, 2, 4096, 4096): SplitTiles(16, 128, 8, 4, 3),
    (8, 2, 28672, 4096): SplitTiles(16, 128, 1, 4, 3),
    (8, 2, 4096, 14336): SplitTiles(16, 128, 8, 4, 3),
    (8, 4, 6144, 4096): SplitTiles(16, 128, 8, 4, 3),
    (8, 4, 4096, 4096): SplitTiles(16, 128, 8, 4, 3),
    (8, 4, 28672, 4096): SplitTiles(16, 128, 1, 4, 3),
    (8, 4, 4096, 14336): SplitTiles(16, 128, 8, 4, 3),
    (8, 8, 6144, 4096): SplitTiles(16, 128, 8, 4, 3),
    (8, 8, 4096, 4096): SplitTiles(16, 128, 8, 4, 3),
    (8, 8, 28672, 4096): SplitTiles(16, 128, 1, 4, 3),
    (8, 8, 4096, 14336): SplitTiles(16, 128, 8, 4, 3),
    (8, 16, 6144, 4096): SplitTiles(16, 128, 8, 4, 3),
    (8, 16, 4096, 4096): SplitTiles(16, 128, 4, 4, 3),
    (8, 16, 28672, 4096): SplitTiles(16, 128, 1, 4, 3),
    (8, 16, 4096, 14336): SplitTiles(16, 128, 8, 4, 3),
    (8, 32, 6144, 4096): SplitTiles(64, 64, 4, 4, 3),
    (8, 32, 4096, 4096): SplitTiles(64, 64, 4, 4, 3),
    (8, 32, 28672, 4096): SplitTiles(64, 64, 1, 4, 3),
    (8, 32, 4096, 14336): SplitTiles(64, 64, 4, 4, 3),
    (8, 64, 6144, 4096): SplitTiles(64, 64, 4, 4, 3),
    (8, 64, 4096, 4096): SplitTiles(64, 64, 4, 4, 3),
    (8, 64, 28672, 4096): SplitTiles(64, 64, 1, 4, 3),
    (8, 64, 4096, 14336): SplitTiles(64, 64, 4, 4, 3),
    (8, 128, 6144, 4096): SplitTiles(128, 128, 2, 8, 3),
    (8, 128, 4096, 4096): SplitTiles(128, 128, 4, 8, 3),
    (8, 128, 28672, 4096): SplitTiles(128, 128, 1, 8, 3),
    (8, 128, 4096, 14336): SplitTiles(128, 128, 4, 8, 3),
    (8, 256, 6144, 4096): SplitTiles(128, 128, 1, 8, 3),
    (8, 256, 4096, 4096): SplitTiles(128, 128, 2, 8, 3),
    (8, 256, 28672, 4096): SplitTiles(128, 64, 1, 8, 3),
    (8, 256, 4096, 14336): SplitTiles(128, 128, 2, 8, 3),
}
INTERPRETER_SPLIT = SplitTiles(16, 32, 1, 4, 1)  # under Triton's interpreter: small tiles, one split


def k_steps(bits: int, k: int) -> int:
    """K steps of the kernels for K input features: INT4 chunks of 8 planes of 32 columns (int4.py's
    default plane), INT8 blocks of 128 columns (int8_gemm.BLOCK_K)."""
    return max(1, -(-k // (256 if bits == 4 else 128)))


def row_bucket(rows: int) -> int:
    return next((b for b in SWEEP_ROWS if rows <= b), SWEEP_ROWS[-1])


def default_split_tiles(bits: int, rows: int, n: int, k: int, sm_count: int = SM_COUNT) -> SplitTiles:
    """The sweep's tiles for this shape if SPLIT_TABLE has them, else: BLOCK_M the rows rounded up to
    16 / 32 / 64, BLOCK_N 64, and as many splits (<= MAX_SPLIT, >= MIN_STEPS K steps each) as bring the
    grid to about two waves of `sm_count` programs."""
    hit = SPLIT_TABLE.get((bits, row_bucket(rows), n, k))
    if hit is not None:
        return hit
    block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64
    block_n = 64
    tiles = triton.cdiv(rows, block_m) * triton.cdiv(n, block_n)
    split = max(1, min(MAX_SPLIT, (2 * sm_count) // tiles, k_steps(bits, k) // MIN_STEPS))
    return SplitTiles(block_m, block_n, split, 4, 4 if block_m <= 32 else 3)


@functools.cache
def sm_count_of(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (host-side, no sync: safe under graph capture)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def _reduce_kernel(part_ptr, bias_ptr, out_ptr, M, N, stride_om, SPLITS, HAS_BIAS: tl.constexpr,
                   BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    """out[m, n] = sum_s part[s, m, n] (+ bias[n]) rounded once to out's dtype; splits summed in order."""
    wait_for_previous(USE_PDL)  # the GEMM's partials are complete and visible past this
    release_next(USE_PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    size = M * N
    mask = offs < size
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(SPLITS):
        acc += tl.load(part_ptr + s * size + offs, mask=mask, other=0.0)
    col = offs % N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + col, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + (offs // N).to(tl.int64) * stride_om + col, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def store_tile(acc, out_ptr, bias_ptr, offs_m, offs_n, mask_m, mask_n, M, N, stride_om,
               SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """A GEMM program's fp32 tile: into its split's slice of the partials [splits, M, N] (SPLIT), or
    with the bias added, rounded once, into out [M, N]."""
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT:
        part = out_ptr + tl.program_id(2).to(tl.int64) * M * N + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.store(part, acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


# launch(grid, dest, steps_per_split, split): runs the GEMM kernel; dest is `out` (split False: bias added,
# x's dtype stored) or the fp32 [splits, M, N] partials (split True: no bias).
Launch = Callable[[tuple[int, int, int], torch.Tensor, int, bool], None]


def launch_split(launch: Launch, steps: int, out: torch.Tensor, bias: torch.Tensor | None,
                 tiles: SplitTiles) -> torch.Tensor:
    """Run a split-K GEMM over `steps` K steps into out [M, N]: one kernel, or the kernel into fp32
    partials then `_reduce_kernel`."""
    rows, n = out.shape
    per = triton.cdiv(steps, max(1, min(tiles.split_k, steps)))
    splits = triton.cdiv(steps, per)  # no empty split: e.g. 4 steps asked in 3 splits run as 2 of 2
    grid = (triton.cdiv(rows, tiles.block_m), triton.cdiv(n, tiles.block_n), splits)
    if splits == 1:
        launch(grid, out, per, False)
        return out
    part = torch.empty(splits, rows, n, dtype=torch.float32, device=out.device)
    launch(grid, part, per, True)
    block = 1024
    _reduce_kernel[(triton.cdiv(rows * n, block),)](
        part, bias if bias is not None else out, out, rows, n, out.stride(0), splits,
        HAS_BIAS=bias is not None, BLOCK=block, num_warps=4, **pdl_options(out.device),
    )
    return out

"""W4A16 tensor-core GEMM on INT4 plane-layout weights (packed.py) for batches past the decode rows.

Why: codes_gemm.py keeps a fresh fp32 accumulator a group beside the running one (three [BLOCK_M, BLOCK_N]
tiles), sums x rows a plane and sends W, the right operand, through shared memory for every plane's wgmma.
Here the plane layout is read as it is (no new layout, no extra bytes): program (m tile, n tile, K split)
loads a chunk's words once, [BLOCK_N, PLANE] int32 = 8 x PLANE consecutive columns a row, and field i of
those words *is* the K-contiguous [BLOCK_N, PLANE] tile of columns i * PLANE + j. Each weight is
dequantized in registers to x's dtype, w = f * 16 s + (m - 16 s) with f = 1 + u / 16 (the code moved into
1.0f's mantissa: a shift, an and-or, an FMA), scales of its plane's group loaded once a group, and tl.dot
accumulates in fp32 across all of K (so any split of the chunks is exact). BLOCK_K = PLANE: a dot a plane,
the words loaded straight into the dot operand's layout; BLOCK_K = SUB * PLANE: SUB planes reshaped into one
[BLOCK_N, BLOCK_K] tile (a shared-memory round trip). SWAP computes out^T = W x^T: W is the wgmma's register
operand and the rows its N (8 .. 256), which suits few rows; else x @ W^T, W through shared memory.
Grid: m tiles fastest, so the m tiles of one weight tile run together (one DRAM read of W, L2 for the
rest); splits > 1 write fp32 partials reduced by splitk.py. Tiles: TILE_TABLE (the H100 sweep's,
`benchmarks/quant_kernels.py --sweep-int4`) by row bucket and shape, else `heuristic_tiles`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from shardserve.parallel.kernels.pdl import pdl_options, release_next, wait_for_previous
from shardserve.workers.quant.kernels.splitk import SplitTiles, launch_split, store_tile
from shardserve.workers.quant.kernels.w4a16_pairs import launch_pairs


@dataclass(frozen=True)
class W4Tiles:
    block_m: int
    block_n: int
    block_k: int  # columns a tl.dot: a power of two, clamped to [PLANE, 8 * PLANE] (whole planes of a chunk);
    # PLANE (one plane a dot) lets the words' loaded layout be the dot operand's (no shared-memory round trip)
    split_k: int  # K splits over the chunks (fewer run when K has fewer chunks)
    num_warps: int
    num_stages: int
    swap: bool = True  # out^T = W x^T (W the left operand); False: x @ W^T
    pairs: bool = False  # w4a16_pairs.py: two weights an instruction, dots of 2 PLANE (swapped; block_k unused)


MIN_ROWS = 9  # from here the engine runs this GEMM (<= 8: torch's tinygemm, or codes_gemm.py's tuned split-K)
DEQUANT_MIN_ROWS = 256  # from here W dequantized + cuBLAS, unless TILE_TABLE has the (row bucket, N, K): the sweep
# prints entries from here only where this GEMM beat dequantize + cuBLAS (`dequant_wins`)
SWEEP_ROWS = (16, 32, 64, 128, 256, 512, 1024)  # row buckets of TILE_TABLE (a row count takes the next one up)
SM_COUNT = 132
SMEM_BYTES = 200 * 1024  # shared memory the pipeline stages may take (an H100 block: 227 KiB)
# (row bucket, N, K) -> tiles: the H100 sweep's best for the Llama-3.1-8B projections (`quant_kernels.py
# --sweep-int4` prints this table; each entry: its time and bf16 cuBLAS's); other shapes take `heuristic_tiles`
# below DEQUANT_MIN_ROWS rows, dequantize + cuBLAS from there (the 256 / 512-row entries where that won are gone).
TILE_TABLE: dict[tuple[int, int, int], W4Tiles] = {
    (16, 6144, 4096): W4Tiles(16, 64, 32, 4, 4, 4),  # 15.9 us, bf16 22.0
    (16, 4096, 4096): W4Tiles(16, 64, 32, 4, 4, 4),  # 12.6 us, bf16 16.3
    (16, 28672, 4096): W4Tiles(16, 64, 32, 1, 4, 4),  # 55.9 us, bf16 85.3
    (16, 4096, 14336): W4Tiles(16, 128, 32, 8, 8, 3, swap=False),  # 29.8 us, bf16 45.0
    (32, 6144, 4096): W4Tiles(32, 128, 32, 4, 8, 3, swap=False),  # 19.7 us, bf16 22.8
    (32, 4096, 4096): W4Tiles(32, 64, 32, 4, 4, 4),  # 13.4 us, bf16 15.2
    (32, 28672, 4096): W4Tiles(32, 128, 32, 1, 8, 3, swap=False),  # 61.5 us, bf16 85.3
    (32, 4096, 14336): W4Tiles(32, 128, 32, 8, 8, 3, swap=False),  # 33.4 us, bf16 46.8
    (64, 6144, 4096): W4Tiles(64, 64, 32, 2, 4, 3),  # 23.6 us, bf16 22.5
    (64, 4096, 4096): W4Tiles(64, 128, 32, 4, 8, 3),  # 16.8 us, bf16 16.1
    (64, 28672, 4096): W4Tiles(64, 64, 32, 1, 4, 3),  # 78.9 us, bf16 88.2
    (64, 4096, 14336): W4Tiles(64, 64, 32, 4, 4, 3),  # 41.8 us, bf16 46.5
    (128, 6144, 4096): W4Tiles(128, 128, 32, 2, 8, 2),  # 35.9 us, bf16 22.8
    (128, 4096, 4096): W4Tiles(128, 128, 32, 4, 8, 2),  # 22.9 us, bf16 16.2
    (128, 28672, 4096): W4Tiles(128, 256, 32, 1, 8, 2),  # 122.6 us, bf16 88.4
    (128, 4096, 14336): W4Tiles(128, 128, 32, 4, 8, 2),  # 66.1 us, bf16 52.3
    (256, 4096, 14336): W4Tiles(128, 128, 32, 2, 8, 2),  # 116.6 us, bf16 57.9, dequantize + cuBLAS 119.4
}
INTERPRETER_TILES = W4Tiles(16, 32, 32, 1, 4, 1)  # under Triton's interpreter: small tiles, a dot a plane


def row_bucket(rows: int) -> int:
    return next((b for b in SWEEP_ROWS if rows <= b), SWEEP_ROWS[-1])


def dequant_wins(rows: int, n: int, k: int) -> bool:
    """Whether the engine dequantizes W and runs cuBLAS at this shape: from DEQUANT_MIN_ROWS rows, unless
    TILE_TABLE holds the shape's row bucket (the sweep's proof that this GEMM won there); past the largest
    bucket always."""
    if rows < DEQUANT_MIN_ROWS:
        return False
    return rows > SWEEP_ROWS[-1] or (row_bucket(rows), n, k) not in TILE_TABLE


def heuristic_tiles(rows: int, n: int, k: int, sm_count: int = SM_COUNT) -> W4Tiles:
    """Until the sweep fills TILE_TABLE: swapped tiles, one plane a dot, the rows rounded up to 16 / 32 / 64
    (128 from 65 rows), 128 output features a tile (x is re-read from L2 once per n tile: at 64 rows a tile
    of 64 would read twice the bytes of x as of W), 8 warps from 64 x 128, 4 / 3 / 3 / 2 stages, and as many K
    splits (<= 8, >= 4 chunks of 256 columns each) as bring the grid to about two waves of `sm_count`."""
    block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64 if rows <= 64 else 128
    block_n = 128
    tiles = triton.cdiv(rows, block_m) * triton.cdiv(n, block_n)
    chunks = max(1, -(-k // 256))
    split = max(1, min(8, (2 * sm_count) // tiles, chunks // 4))
    warps = 8 if block_m >= 64 else 4
    stages = 4 if block_m <= 16 else 3 if block_m <= 64 else 2
    return W4Tiles(block_m, block_n, 32, split, warps, stages)


def default_tiles(rows: int, n: int, k: int, sm_count: int = SM_COUNT) -> W4Tiles:
    hit = TILE_TABLE.get((row_bucket(rows), n, k))
    return hit if hit is not None else heuristic_tiles(rows, n, k, sm_count)


def supported(bits: int, plane: int, scales_dtype: torch.dtype, dtype: torch.dtype) -> bool:
    """INT4 planes of 16 - 64 columns (wider: a chunk's x tile alone would fill shared memory) with scales in
    the activation dtype (bf16 / fp16); the exact float32-scale layouts (GGUF k-quants) keep their own paths."""
    return bits == 4 and 16 <= plane <= 64 and dtype in (torch.bfloat16, torch.float16) and scales_dtype == dtype


@triton.jit
def _field(words, i: tl.constexpr):
    """Field i of each word as f = 1 + u / 16 (fp32): the field moved to 1.0f's top mantissa bits, one shift
    (its direction known at compile time) and one and-or."""
    shift: tl.constexpr = 19 - 4 * i
    if shift >= 0:
        t = words << shift
    else:
        t = words >> (-shift)
    return ((t & 0x00780000) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit(do_not_specialize=["M", "STEPS_PER_SPLIT"])  # one binary for every row count and split
def _w4a16_kernel(
    x_ptr, w_ptr, s_ptr, m_ptr, bias_ptr, out_ptr, M, N, K, KW, stride_xm, stride_om, STEPS_PER_SPLIT,
    PLANE: tl.constexpr, GROUP: tl.constexpr, SUB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SWAP: tl.constexpr, EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, USE_PDL: tl.constexpr,
):
    """SPLIT: out_ptr is fp32 partials [splits, M, N] (no bias); else out [M, N] in x's dtype. EVEN_K: K is
    whole chunks (no column mask on the x tiles)."""
    wait_for_previous(USE_PDL)  # parallel/kernels/pdl.py's protocol: nothing read before it
    release_next(USE_PDL)
    CHUNK: tl.constexpr = 8 * PLANE
    BLOCK_K: tl.constexpr = SUB * PLANE
    GROUP_PLANES: tl.constexpr = GROUP // PLANE
    # planes between scale loads: a group's planes when groups tile the chunk (or chunks tile a group), else 1
    SCALE_EVERY: tl.constexpr = (GROUP_PLANES if 8 % GROUP_PLANES == 0 else 1) if GROUP_PLANES <= 8 else \
        (8 if GROUP_PLANES % 8 == 0 else 1)
    dtype = x_ptr.dtype.element_ty
    pid_m = tl.program_id(0)  # fastest: the m tiles of one weight tile run together (L2)
    pid_n = tl.program_id(1)
    first = tl.program_id(2) * STEPS_PER_SPLIT  # this split's chunks
    last = tl.minimum(first + STEPS_PER_SPLIT, KW // PLANE)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, PLANE)
    offs_k = tl.arange(0, BLOCK_K)
    offs_i = tl.arange(0, SUB)
    mask_m = offs_m < M
    mask_n = offs_n < N
    n64 = offs_n.to(tl.int64)
    m64 = offs_m.to(tl.int64)
    if SWAP:  # W tiles [BLOCK_N, BLOCK_K] (left), x^T tiles [BLOCK_K, BLOCK_M] (right), acc [BLOCK_N, BLOCK_M]
        w_tile = w_ptr + n64[:, None] * KW + offs_j[None, :]
        x_tile = x_ptr + m64[None, :] * stride_xm + offs_k[:, None]
        w_mask = mask_n[:, None]
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:  # W tiles [BLOCK_K, BLOCK_N] (right), x tiles [BLOCK_M, BLOCK_K] (left), acc [BLOCK_M, BLOCK_N]
        w_tile = w_ptr + n64[None, :] * KW + offs_j[:, None]
        x_tile = x_ptr + m64[:, None] * stride_xm + offs_k[None, :]
        w_mask = mask_n[None, :]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for c in range(first, last):
        words = tl.load(w_tile + c * PLANE, mask=w_mask, other=0)
        for q in tl.static_range(8 // SUB):
            col0 = c * CHUNK + q * BLOCK_K
            if SUB == 1:  # one plane a dot: 2-D tiles, no reshape (the words' layout can be the dot operand's)
                if q % SCALE_EVERY == 0:  # a group starts at this plane (or at this chunk): its scales
                    g = (col0 // GROUP) * N
                    s = tl.load(s_ptr + g + n64, mask=mask_n, other=0.0).to(tl.float32) * 16.0
                    m = tl.load(m_ptr + g + n64, mask=mask_n, other=0.0).to(tl.float32) - s
                f = _field(words, q)
                if SWAP:
                    w = (f * s[:, None] + m[:, None]).to(dtype)
                else:
                    w = (f * s[None, :] + m[None, :]).to(dtype)
            else:
                fields = q * SUB + offs_i  # [SUB]: the planes of this dot
                groups = ((col0 + offs_i * PLANE) // GROUP) * N  # a plane lies inside one group
                if SWAP:
                    t = words[:, None, :] >> (4 * fields)[None, :, None]  # [BLOCK_N, SUB, PLANE]
                    sp = s_ptr + groups[None, :, None] + n64[:, None, None]
                    mp = m_ptr + groups[None, :, None] + n64[:, None, None]
                    sm_mask = mask_n[:, None, None]
                else:
                    t = words[None, :, :] >> (4 * fields)[:, None, None]  # [SUB, PLANE, BLOCK_N]
                    sp = s_ptr + groups[:, None, None] + n64[None, None, :]
                    mp = m_ptr + groups[:, None, None] + n64[None, None, :]
                    sm_mask = mask_n[None, None, :]
                f = (((t << 19) & 0x00780000) | 0x3F800000).to(tl.float32, bitcast=True)  # 1 + u / 16
                s = tl.load(sp, mask=sm_mask, other=0.0).to(tl.float32) * 16.0
                m = tl.load(mp, mask=sm_mask, other=0.0).to(tl.float32) - s
                w = (f * s + m).to(dtype)
                if SWAP:
                    w = tl.reshape(w, [BLOCK_N, BLOCK_K])
                else:
                    w = tl.reshape(w, [BLOCK_K, BLOCK_N])
            if SWAP:
                if EVEN_K:
                    xv = tl.load(x_tile + col0, mask=mask_m[None, :], other=0.0)
                else:
                    xv = tl.load(x_tile + col0, mask=((col0 + offs_k) < K)[:, None] & mask_m[None, :], other=0.0)
                acc = tl.dot(w, xv, acc)
            else:
                if EVEN_K:
                    xv = tl.load(x_tile + col0, mask=mask_m[:, None], other=0.0)
                else:
                    xv = tl.load(x_tile + col0, mask=mask_m[:, None] & ((col0 + offs_k) < K)[None, :], other=0.0)
                acc = tl.dot(xv, w, acc)
    if SWAP:
        acc = tl.trans(acc)
    store_tile(acc, out_ptr, bias_ptr, offs_m, offs_n, mask_m, mask_n, M, N, stride_om, SPLIT, HAS_BIAS)


def sub_planes(plane: int, block_k: int) -> int:
    """Planes a dot: block_k / plane within [1, 8] (a dot takes whole planes of one chunk)."""
    if block_k & (block_k - 1) or block_k < 16:
        raise ValueError(f"block_k must be a power of two >= 16, got {block_k}")
    return max(1, min(8, block_k // plane))


def w4a16_gemm(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
               bias: torch.Tensor | None, out: torch.Tensor, *, plane: int, group_size: int, k: int,
               tiles: W4Tiles) -> torch.Tensor:
    """out [M, N] = x [M, K] @ W^T + bias for INT4 plane-layout W (packed.PlaneWeights' tensors: words
    [N, KW], scales / mins [groups, N] in x's dtype), K split `tiles.split_k` ways over its chunks;
    pipeline stages cut to what fits in shared memory (`fitting_stages`); `tiles.pairs`: w4a16_pairs.py."""
    rows, n = out.shape
    kw = words.shape[1]
    stages = fitting_stages(tiles, plane)
    split = SplitTiles(tiles.block_m, tiles.block_n, tiles.split_k, tiles.num_warps, stages)
    if tiles.pairs:
        if not tiles.swap:
            raise ValueError("the paired W4A16 GEMM runs swapped only (W the register operand)")
        run = launch_pairs(x, words, scales, mins, bias, plane, group_size, tiles.block_m, tiles.block_n,
                           tiles.num_warps, stages)
        return launch_split(run, kw // plane, out, bias, split)
    sub = sub_planes(plane, tiles.block_k)

    def launch(grid: tuple[int, int, int], dest: torch.Tensor, per: int, split: bool) -> None:
        _w4a16_kernel[grid](
            x, words, scales, mins, bias if bias is not None else out, dest, rows, n, k, kw,
            x.stride(0), out.stride(0), per, PLANE=plane, GROUP=group_size, SUB=sub,
            BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, SWAP=tiles.swap, EVEN_K=k % (8 * plane) == 0,
            HAS_BIAS=bias is not None,
            SPLIT=split, num_warps=tiles.num_warps, num_stages=stages, **pdl_options(x.device),
        )

    return launch_split(launch, kw // plane, out, bias, split)


def fitting_stages(tiles: W4Tiles, plane: int) -> int:
    """tiles.num_stages, fewer where a stage (a chunk's words [BLOCK_N, PLANE] int32 and x [BLOCK_M, 8 PLANE])
    times the stages would pass SMEM_BYTES of shared memory: a K step is a whole chunk."""
    per_stage = tiles.block_n * plane * 4 + tiles.block_m * 8 * plane * 2
    return max(1, min(tiles.num_stages, SMEM_BYTES // per_stage))

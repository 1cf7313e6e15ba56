"""MoE token alignment in Triton: group the T*k (token, slot) rows by local expert, padded to BLOCK_M.

Input `topk_ids [T, k]` (global expert ids, int32 or int64), read as N = T*k flat rows
`row = t * k + slot`. Output, with E = num_local experts of this rank (global ids
`local_expert_start .. + E`) and L = `padded_length(N, E, BLOCK_M)`:
  `sorted_token_ids [L] int32`  rows grouped by local expert, each group padded to a multiple of
                                BLOCK_M with the sentinel N; rows of other ranks' experts are absent;
  `expert_ids [L / BLOCK_M] int32` the local expert of each M-block, -1 past the used length;
  `num_tokens_post_padded [1] int32` the used length (sum of the padded group sizes).

Data flow (P programs, each owning a contiguous slice of rows, walked in CHUNK-row steps with a
one-hot [CHUNK, E_PAD] tile): `_moe_count_kernel` counts each slice's rows per local expert, then
`_moe_align_kernel` derives every expert's group start from all counts and scatters its rows,
keeping their flat order within a group (exactly the stable torch sort of
`moe_reference.moe_align_block_size_torch`). With P = 1 (few rows: decode) the align kernel counts
the rows itself: one launch. Grids depend only on N, E and BLOCK_M and nothing is read back on
the host, so the launches are CUDA-graph capturable and a graph replays for any routing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_PROGRAMS = 128  # more slices make every program's read of counts [P, E] longer
SINGLE_PROGRAM_CHUNKS = 4  # up to this many CHUNK steps of rows: one program, one launch


def padded_length(num_rows: int, num_local: int, block_m: int) -> int:
    """Length of sorted_token_ids: the padded-length bound rounded up to whole M-blocks.

    At most min(E, N) groups are non-empty and each gains < BLOCK_M padding slots.
    """
    bound = num_rows + min(num_local, num_rows) * (block_m - 1)
    return triton.cdiv(bound, block_m) * block_m


@triton.jit
def _local_onehot(ids_ptr, rows, num_rows, expert_lo, num_local, E_PAD: tl.constexpr):
    """([CHUNK, E_PAD] bool one-hot of each row's local expert, [CHUNK] row is ours and in range)."""
    in_range = rows < num_rows
    local = tl.load(ids_ptr + rows, mask=in_range, other=0) - expert_lo
    valid = in_range & (local >= 0) & (local < num_local)
    onehot = (local[:, None] == tl.arange(0, E_PAD)[None, :]) & valid[:, None]
    return onehot, valid


@triton.jit
def _slice_counts(ids_ptr, first_row, rows_per_prog, num_rows, expert_lo, num_local,
                  E_PAD: tl.constexpr, CHUNK: tl.constexpr):
    """[E_PAD] int32: rows of each local expert among rows [first_row, first_row + rows_per_prog)."""
    counts = tl.zeros([E_PAD], dtype=tl.int32)
    for c in range(0, rows_per_prog, CHUNK):
        rows = first_row + c + tl.arange(0, CHUNK)
        onehot, _ = _local_onehot(ids_ptr, rows, num_rows, expert_lo, num_local, E_PAD)
        counts += tl.sum(onehot.to(tl.int32), axis=0)
    return counts


# Runtime sizes are not specialised (== 1, % 16): one compile per tile config for every batch size.
_SIZES = ["num_rows", "expert_lo", "num_local", "rows_per_prog"]


@triton.jit(do_not_specialize=_SIZES)
def _moe_count_kernel(ids_ptr, counts_ptr, num_rows, expert_lo, num_local, rows_per_prog,
                      E_PAD: tl.constexpr, CHUNK: tl.constexpr):
    pid = tl.program_id(0)
    counts = _slice_counts(ids_ptr, pid * rows_per_prog, rows_per_prog, num_rows, expert_lo, num_local,
                           E_PAD, CHUNK)
    tl.store(counts_ptr + pid * E_PAD + tl.arange(0, E_PAD), counts)


@triton.jit(do_not_specialize=_SIZES + ["num_programs", "blocks_per_prog", "num_blocks"])
def _moe_align_kernel(
    ids_ptr, counts_ptr, sorted_ids_ptr, expert_ids_ptr, num_post_ptr,
    num_rows, expert_lo, num_local, rows_per_prog, num_programs, blocks_per_prog, num_blocks,
    BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, CHUNK: tl.constexpr, P_CHUNK: tl.constexpr,
    NB: tl.constexpr, COUNT_HERE: tl.constexpr,
):
    """Every program reads all of `counts [P, E_PAD]` and derives, in registers, each expert's total,
    padded size and group start (`tl.cumsum` over experts) and the rows of its expert in earlier
    programs' slices, then scatters its rows to `group_start[e] + rows of e in earlier slices + rank
    of the row among e's rows in this slice` (a cumsum of the one-hot tile down the rows). It also
    writes its share of the M-blocks: `expert_ids` (the block's first slot located among the group
    ends) and the sentinel into the block's padding slots. Every slot of `sorted_token_ids` is
    written exactly once (a row or padding), so no prior fill is needed.
    """
    pid = tl.program_id(0)
    experts = tl.arange(0, E_PAD)
    first_row = pid * rows_per_prog

    # Totals per expert, and rows of each expert in the slices before this program's.
    if COUNT_HERE:  # the only program: count the rows here (no count launch)
        counts = _slice_counts(ids_ptr, first_row, rows_per_prog, num_rows, expert_lo, num_local, E_PAD, CHUNK)
        before = tl.zeros([E_PAD], dtype=tl.int32)
    else:
        counts = tl.zeros([E_PAD], dtype=tl.int32)
        before = tl.zeros([E_PAD], dtype=tl.int32)
        for p0 in range(0, num_programs, P_CHUNK):
            progs = p0 + tl.arange(0, P_CHUNK)
            tile = tl.load(counts_ptr + progs[:, None] * E_PAD + experts[None, :],
                           mask=(progs < num_programs)[:, None], other=0)  # [P_CHUNK, E_PAD]
            counts += tl.sum(tile, axis=0)
            before += tl.sum(tl.where((progs < pid)[:, None], tile, 0), axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M  # [E_PAD]; 0 for empty and padding experts
    ends = tl.cumsum(padded, axis=0)  # [E_PAD] inclusive end of each group
    starts = ends - padded
    total = tl.sum(padded, axis=0)

    # Rows: dest = group start + earlier slices' rows of the expert + rank within this slice so far.
    base = starts + before  # [E_PAD] next free slot of each expert for this program
    for c in range(0, rows_per_prog, CHUNK):
        rows = first_row + c + tl.arange(0, CHUNK)
        onehot, valid = _local_onehot(ids_ptr, rows, num_rows, expert_lo, num_local, E_PAD)
        hot = onehot.to(tl.int32)
        slot = tl.cumsum(hot, axis=0) - 1 + base[None, :]  # [CHUNK, E_PAD]; read at each row's expert
        dest = tl.sum(tl.where(onehot, slot, 0), axis=1)  # [CHUNK]
        tl.store(sorted_ids_ptr + dest, rows, mask=valid)
        base += tl.sum(hot, axis=0)

    # M-blocks of this program: expert id, and the sentinel in every slot past the group's rows.
    real_end = starts + counts  # [E_PAD] first padding slot of each group
    for b0 in range(0, blocks_per_prog, NB):
        local_b = b0 + tl.arange(0, NB)
        blocks = pid * blocks_per_prog + local_b
        block_mask = (local_b < blocks_per_prog) & (blocks < num_blocks)
        first_slot = blocks * BLOCK_M  # [NB]
        # The group holding first_slot is the number of groups ending at or before it (empty
        # groups end where they start, so they are skipped).
        owner = tl.sum((ends[None, :] <= first_slot[:, None]).to(tl.int32), axis=1)
        owner = tl.where(first_slot < total, owner, -1)
        tl.store(expert_ids_ptr + blocks, owner, mask=block_mask)
        rows_end = tl.sum(tl.where(experts[None, :] == owner[:, None], real_end[None, :], 0), axis=1)  # 0 if -1
        slots = first_slot[:, None] + tl.arange(0, BLOCK_M)[None, :]  # [NB, BLOCK_M]
        tl.store(sorted_ids_ptr + slots, tl.full([NB, BLOCK_M], 0, tl.int32) + num_rows,
                 mask=block_mask[:, None] & (slots >= rows_end[:, None]))

    if pid == 0:
        tl.store(num_post_ptr, total)


def moe_align_block_size(topk_ids: torch.Tensor, block_m: int, local_expert_start: int, num_local: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted_token_ids [L] int32, expert_ids [L / block_m] int32, num_tokens_post_padded [1] int32).

    topk_ids [T, k]: global expert ids. One or two launches with grids fixed by the shapes, no
    host sync (graph-capturable). block_m must be a power of two.
    """
    if block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two, got {block_m}")
    device = topk_ids.device
    ids = topk_ids.reshape(-1)
    if not ids.is_contiguous():
        ids = ids.contiguous()
    num_rows = ids.numel()
    length = padded_length(num_rows, num_local, block_m)
    num_blocks = length // block_m
    sorted_ids = torch.empty(length, dtype=torch.int32, device=device)
    expert_ids = torch.empty(num_blocks, dtype=torch.int32, device=device)
    num_post = torch.empty(1, dtype=torch.int32, device=device)

    e_pad = max(16, triton.next_power_of_2(num_local))
    chunk = max(16, min(128, 8192 // e_pad))  # one-hot tile [CHUNK, E_PAD] of at most 8k elements
    num_chunks = triton.cdiv(max(num_rows, 1), chunk)
    if num_chunks <= SINGLE_PROGRAM_CHUNKS:
        num_programs, chunks_per_prog = 1, num_chunks
    else:
        chunks_per_prog = triton.cdiv(num_chunks, MAX_PROGRAMS)
        num_programs = triton.cdiv(num_chunks, chunks_per_prog)
    rows_per_prog = chunk * chunks_per_prog
    blocks_per_prog = triton.cdiv(num_blocks, num_programs)
    nb = max(1, 4096 // max(e_pad, block_m))  # [NB, E_PAD] and [NB, BLOCK_M] tiles of at most 4k elements
    common = dict(E_PAD=e_pad, CHUNK=chunk, num_warps=4)
    counts = sorted_ids  # unused placeholder pointer when the align kernel counts itself
    if num_programs > 1:
        counts = torch.empty(num_programs, e_pad, dtype=torch.int32, device=device)
        _moe_count_kernel[(num_programs,)](ids, counts, num_rows, local_expert_start, num_local, rows_per_prog,
                                           **common)
    _moe_align_kernel[(num_programs,)](
        ids, counts, sorted_ids, expert_ids, num_post,
        num_rows, local_expert_start, num_local, rows_per_prog, num_programs, blocks_per_prog, num_blocks,
        BLOCK_M=block_m, P_CHUNK=max(1, min(32, 4096 // e_pad)), NB=nb, COUNT_HERE=num_programs == 1, **common,
    )
    return sorted_ids, expert_ids, num_post

"""Tensor-parallel all-reduce fused with the residual add and RMSNorm that follow it: one kernel.

Why: at decode every row-parallel layer (o_proj, down_proj) ends in an all-reduce of a few KB,
and the next thing the model does with the sum is `rmsnorm(sum + residual)`. PyTorch's
symmetric-memory one-shot all-reduce (two barriers per call) plus a separate norm kernel were a
visible share of a TP 2 decode step (figures: benchmarks/README.md).

Data flow (W ranks, each with the same symmetric buffer mapped from every peer): each program
pushes its rows of x into every rank's data area, signals, waits for every peer's rows, then sums
the W slots of each row in rank order 0..W-1 in fp32 (the same order on every rank, so all hold
bit-identical sums), rounds to the model dtype (the all-reduced value) and runs exactly the
arithmetic of `rmsnorm.py`. Two protocols share the launcher and that epilogue: `flags`
(`_allreduce_rmsnorm_kernel`: release/acquire flags per program and call) and `lamport`
(`_allreduce_rmsnorm_lamport_kernel`: the data is its own flag; the engine's default, faster on
2 H100s). Each kernel's docstring says why its synchronisation is enough.

Setup and the choice of when to use it live in `parallel/fused_allreduce_norm.py` (the buffer
itself in `parallel/custom_allreduce.py`); this file is the kernels and their launcher. On CPU,
tests run it through Triton's interpreter with one thread per simulated rank (the flag protocol
is real: each thread spins on the others' stores).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from shardserve.parallel.kernels.pdl import pdl_options, release_next, wait_for_previous
from shardserve.parallel.kernels.rmsnorm import check_norm_args, residual_norm_store

NUM_PROGRAMS = 32  # G: fixed, identical on every rank (rows are split over the G programs)


@triton.jit
def _finish_row(acc, row, residual_ptr, w, out_ptr, new_residual_ptr, eps, hidden_size, stride_r, stride_o,
                stride_nr, offs, mask, HAS_RESIDUAL: tl.constexpr):
    """acc: one row's fp32 sum over the ranks -> rounded as the collective returns it, then
    rmsnorm.py's residual add and norm (without a residual the sum itself is the new residual)."""
    h = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
    if not HAS_RESIDUAL:
        tl.store(new_residual_ptr + row * stride_nr + offs, h.to(out_ptr.dtype.element_ty), mask=mask)
    residual_norm_store(h, row, residual_ptr, w, out_ptr, new_residual_ptr, eps, hidden_size, stride_r, stride_o,
                        stride_nr, offs, mask, HAS_RESIDUAL)


@triton.jit
def _allreduce_rmsnorm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, new_residual_ptr,
    data_ptrs, flag_ptrs, counter_ptr,
    rank, num_tokens, hidden_size, rows_per_program, max_rows, half_stride, eps,
    stride_x, stride_r, stride_o, stride_nr,
    WORLD: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):
    """Flags protocol (`data_ptrs[q]` and `flag_ptrs[q]` are rank q's data and flag areas as seen here):
      1. push: program p copies its rows of x into slot [parity][me][row] of EVERY rank's data area
         (peer stores are posted, so this costs one one-way NVLink trip, not a round trip);
      2. signal: after a CTA barrier, a release store at system scope of `epoch` into flag
         [p][me] of every rank;
      3. wait: acquire loads of this rank's own flags [p][q] until every q reached `epoch`, then a
         CTA barrier so every thread reads after the acquire;
      4. reduce and norm (see the module docstring).
    `epoch` is the call count: each of the G programs keeps its own counter (`counters[p]`) and
    every call launches all G programs (those without rows only bump their counter), so every
    counter equals the call count on every rank. Data slots alternate by epoch parity, which is why
    one barrier per call suffices: this rank can only enter call N after one of its programs saw a
    peer's epoch-(N-1) flag, which that peer sent after its whole call N-2 had finished, so the
    slots of parity N % 2 are free. Rows go to programs in contiguous chunks; programs are at most
    G = 32, all resident at once, so a program never waits on a peer program that cannot be
    scheduled. Counters and flags are int64: they never wrap.
    """
    wait_for_previous(USE_PDL)
    release_next(USE_PDL)
    pid = tl.program_id(0)
    epoch = tl.load(counter_ptr + pid) + 1  # this call's number (int64)
    tl.store(counter_ptr + pid, epoch)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, num_tokens)
    if row_start < num_tokens:
        dtype = x_ptr.dtype.element_ty
        offs = tl.arange(0, BLOCK)  # [BLOCK] >= hidden_size
        mask = offs < hidden_size
        half = (epoch % 2) * half_stride  # element offset of this call's parity
        # 1. push this rank's rows into slot [parity][rank][row] of every rank's data area. An
        # address read from the table carries no alignment: the areas are 16-byte aligned
        # (fused_allreduce_norm.py), and saying so turns 2-byte scalar NVLink stores into 16-byte ones.
        for row in range(row_start, row_end):
            x = tl.load(x_ptr + row * stride_x + offs, mask=mask)
            slot = half + (rank * max_rows + row) * hidden_size
            for q in tl.static_range(WORLD):
                dst = tl.multiple_of(tl.load(data_ptrs + q).to(tl.pointer_type(dtype)), 16)
                tl.store(dst + slot + offs, x, mask=mask)
        # 2. every thread's stores happen before the flag release (bar.sync, then release at sys scope)
        tl.debug_barrier()
        for q in tl.static_range(WORLD):
            flags = tl.load(flag_ptrs + q).to(tl.pointer_type(tl.int64))
            tl.atomic_xchg(flags + pid * WORLD + rank, epoch, sem="release", scope="sys")
        # 3. wait until every rank's rows of this program arrived
        mine = tl.load(flag_ptrs + rank).to(tl.pointer_type(tl.int64))
        for q in tl.static_range(WORLD):
            seen = tl.atomic_add(mine + pid * WORLD + q, 0, sem="acquire", scope="sys")
            while seen < epoch:
                seen = tl.atomic_add(mine + pid * WORLD + q, 0, sem="acquire", scope="sys")
        tl.debug_barrier()
        # 4. reduce in rank order, then residual add + RMSNorm as in rmsnorm.py
        local = tl.multiple_of(tl.load(data_ptrs + rank).to(tl.pointer_type(dtype)), 16)
        w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        for row in range(row_start, row_end):
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for q in tl.static_range(WORLD):
                slot = half + (q * max_rows + row) * hidden_size
                acc += tl.load(local + slot + offs, mask=mask, other=0.0).to(tl.float32)
            _finish_row(acc, row, residual_ptr, w, out_ptr, new_residual_ptr, eps, hidden_size, stride_r,
                        stride_o, stride_nr, offs, mask, HAS_RESIDUAL)


# ---- Lamport protocol: the data is its own flag ---------------------------------------------
# The engine's default (`parallel.fused_allreduce_protocol: flags` selects the one above).
# Every slot starts as a sentinel bit pattern that no pushed value has (a value equal to it is
# pushed as +0.0: for 16-bit types the sentinel is -0.0, for fp32 one negative denormal). A reader
# polls its slots with volatile loads until no lane holds the sentinel: no flag, no system-scope
# fence, one one-way NVLink trip. Three buffers rotate with the call count: call e writes buffer
# e % 3 and clears (back to the sentinel) what call e - 1 wrote into buffer (e - 1) % 3 of this
# rank. A peer can be at most one call ahead (it needs this rank's rows of each call to finish
# it), so it writes buffer e % 3 or (e + 1) % 3, never the one being cleared. Each call records
# the words it wrote per rank region (counters[PROGRAMS + b], by program 0); the layout is in
# bytes, so a call of another width or dtype (the setup's self-test) clears exactly that.
SENTINEL_16 = -32768  # 0x8000: -0.0 in bf16 / fp16
SENTINEL_32 = -2147450880  # 0x80008000: two 16-bit sentinels, so one int32 fill serves every dtype


@triton.jit
def _is_sentinel(v, BITS: tl.constexpr):
    if BITS == 16:
        return v.to(tl.int16, bitcast=True) == -32768
    else:
        return v.to(tl.int32, bitcast=True) == -2147450880


@triton.jit
def _allreduce_rmsnorm_lamport_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, new_residual_ptr,
    data_ptrs, counter_ptr,
    rank, num_tokens, hidden_size, rows_per_program, region_stride, third_stride, eps,
    stride_x, stride_r, stride_o, stride_nr, region_words, third_words,
    WORLD: tl.constexpr, WORLD_PAD: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
    BITS: tl.constexpr, PROGRAMS: tl.constexpr, CLEAR_BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):
    # Layout in bytes, whatever the call's width and dtype: buffer b, rank q's region, row r at
    # b * third + q * region + r * hidden * itemsize (strides passed in elements and in int32 words).
    wait_for_previous(USE_PDL)
    release_next(USE_PDL)
    pid = tl.program_id(0)
    epoch = tl.load(counter_ptr + pid) + 1  # this call's number (int64)
    tl.store(counter_ptr + pid, epoch)
    current = epoch % 3
    previous = (epoch + 2) % 3
    previous_words = tl.load(counter_ptr + PROGRAMS + previous).to(tl.int32)  # what call e - 1 wrote per region
    if pid == 0:
        tl.store(counter_ptr + PROGRAMS + current, (num_tokens * hidden_size * (BITS // 8) + 3) // 4 + 0 * epoch)
    dtype = x_ptr.dtype.element_ty
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden_size
    local = tl.multiple_of(tl.load(data_ptrs + rank).to(tl.pointer_type(dtype)), 16)  # 16-byte aligned areas
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, num_tokens)
    if row_start < num_tokens:
        base = current * third_stride
        for row in range(row_start, row_end):  # 1. push (no sentinel value leaves this rank)
            x = tl.load(x_ptr + row * stride_x + offs, mask=mask)
            x = tl.where(_is_sentinel(x, BITS), tl.zeros_like(x), x)
            slot = base + rank * region_stride + row * hidden_size
            for q in tl.static_range(WORLD):
                dst = tl.multiple_of(tl.load(data_ptrs + q).to(tl.pointer_type(dtype)), 16)
                tl.store(dst + slot + offs, x, mask=mask)
        w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        # 2. poll until every rank's row is in, reduce, norm. All WORLD slots of a row are polled
        # in one [WORLD_PAD, BLOCK] load, so waiting costs one memory round trip, not one per rank.
        offs_q = tl.arange(0, WORLD_PAD)
        tile_mask = (offs_q < WORLD)[:, None] & mask[None, :]
        for row in range(row_start, row_end):
            src = local + base + offs_q[:, None] * region_stride + row * hidden_size + offs[None, :]
            v = tl.load(src, mask=tile_mask, other=0.0, volatile=True)
            while tl.sum(tl.sum((_is_sentinel(v, BITS) & tile_mask).to(tl.int32), 1), 0) > 0:
                v = tl.load(src, mask=tile_mask, other=0.0, volatile=True)
            v = v.to(tl.float32)
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for q in tl.static_range(WORLD):  # rank order, as the flags kernel sums: the same bits
                acc += tl.sum(tl.where(offs_q[:, None] == q, v, 0.0), 0)
            _finish_row(acc, row, residual_ptr, w, out_ptr, new_residual_ptr, eps, hidden_size, stride_r,
                        stride_o, stride_nr, offs, mask, HAS_RESIDUAL)
    # 3. every program: what call e - 1 wrote into this rank's previous buffer back to the sentinel
    # (its words, in CLEAR_BLOCK chunks spread over the programs; int32 stores serve every dtype)
    words = tl.multiple_of(tl.load(data_ptrs + rank).to(tl.pointer_type(tl.int32)), 16)
    chunk_offs = tl.arange(0, CLEAR_BLOCK)
    sentinel = tl.full([CLEAR_BLOCK], -2147450880, tl.int32)
    for chunk in range(pid, tl.cdiv(previous_words, CLEAR_BLOCK), PROGRAMS):
        word = chunk * CLEAR_BLOCK + chunk_offs
        for q in tl.static_range(WORLD):
            tl.store(words + previous * third_words + q * region_words + word, sentinel, mask=word < previous_words)


# ---- launcher -------------------------------------------------------------------------------

PROTOCOLS = ("flags", "lamport")
NUM_COUNTERS = NUM_PROGRAMS + 3  # per-program call counts, then (lamport) each buffer's row count


def slot_area_bytes(half_bytes: int, protocol: str) -> int:
    """Bytes one call's slots may use: a parity half (flags), a third of both halves (lamport)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    return half_bytes if protocol == "flags" else (2 * half_bytes // 3) // 16 * 16


def region_bytes(half_bytes: int, world_size: int) -> int:
    """Lamport: one rank's region of a buffer, in bytes (16-byte multiple)."""
    return (slot_area_bytes(half_bytes, "lamport") // world_size) // 16 * 16


def rows_capacity(half_bytes: int, world_size: int, hidden_size: int, element_size: int,
                  protocol: str = "flags") -> int:
    """Most token rows one call can take: one call's area holds W slots of max_rows rows."""
    if protocol == "lamport":
        return region_bytes(half_bytes, world_size) // (hidden_size * element_size)
    return slot_area_bytes(half_bytes, protocol) // (world_size * hidden_size * element_size)


def allreduce_rmsnorm(
    x: torch.Tensor,  # [T, H] this rank's partial sum
    residual: torch.Tensor | None,  # [T, H]
    weight: torch.Tensor,  # [H]
    eps: float,
    *,
    rank: int,
    world_size: int,
    data_ptrs: torch.Tensor,  # int64 [W]: every rank's data area (this rank's mapping of it)
    flag_ptrs: torch.Tensor | None,  # int64 [W]: every rank's flag area, NUM_PROGRAMS * W int64 each (flags)
    counters: torch.Tensor,  # int64 [NUM_COUNTERS], this rank's, zeroed at setup
    half_bytes: int,  # bytes of one parity half of the data area (the area is 2 * half_bytes)
    protocol: str = "flags",  # lamport: the data area must start filled with SENTINEL_32
    compile_only: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:  # (out [T, H], new_residual [T, H])
    """`s = sum over ranks of x`; `new_residual = s + residual` (or s); `out = rmsnorm(new_residual) * weight`.

    Every rank of the group must make the same calls in the same order (as TP ranks do).
    compile_only: compile and load the kernel for these arguments without launching it (for
    tests that simulate several ranks with threads of one process on one GPU)."""
    num_tokens, hidden_size = check_norm_args(x, weight, residual)
    max_rows = rows_capacity(half_bytes, world_size, hidden_size, x.element_size(), protocol)
    if num_tokens > max_rows:
        raise ValueError(f"{num_tokens} rows exceed the buffer's {max_rows} rows of {hidden_size} at world size {world_size}")
    if counters.numel() != NUM_COUNTERS or data_ptrs.numel() != world_size or (
            protocol == "flags" and (flag_ptrs is None or flag_ptrs.numel() != world_size)):
        raise ValueError("counters must have NUM_COUNTERS entries and data_ptrs / flag_ptrs one per rank")
    out = torch.empty_like(x)
    new_residual = torch.empty_like(x)
    # Every call launches all programs (even with 0 rows) so each program's counter is the call count.
    rows_per_program = max(1, triton.cdiv(num_tokens, NUM_PROGRAMS))
    head = (x, x if residual is None else residual, weight, out, new_residual)
    strides = (x.stride(0), x.stride(0) if residual is None else residual.stride(0), out.stride(0),
               new_residual.stride(0))
    meta = dict(WORLD=world_size, HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(hidden_size),
                num_warps=8 if hidden_size >= 4096 else 4, **pdl_options(x.device))
    area, item = slot_area_bytes(half_bytes, protocol), x.element_size()
    if protocol == "flags":
        kernel = _allreduce_rmsnorm_kernel
        args = (*head, data_ptrs, flag_ptrs, counters, rank, num_tokens, hidden_size, rows_per_program, max_rows,
                area // item, eps, *strides)
    else:
        region = region_bytes(half_bytes, world_size)
        kernel = _allreduce_rmsnorm_lamport_kernel
        args = (*head, data_ptrs, counters, rank, num_tokens, hidden_size, rows_per_program, region // item,
                area // item, eps, *strides, region // 4, area // 4)
        meta.update(BITS=8 * item, PROGRAMS=NUM_PROGRAMS, CLEAR_BLOCK=1024,
                    WORLD_PAD=triton.next_power_of_2(world_size))
    if compile_only:
        # Compile and load the kernel now, so no later launch loads a module: loading allocates
        # device memory, which waits for the device to go idle, and a kernel spinning on a peer
        # launched from another thread of this process would never let it.
        compiled = kernel.warmup(*args, grid=(NUM_PROGRAMS,), **meta)
        getattr(compiled, "_init_handles", lambda: None)()
    else:
        kernel[(NUM_PROGRAMS,)](*args, **meta)
    return out, new_residual

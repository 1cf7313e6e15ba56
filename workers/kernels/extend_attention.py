"""Extend / prefill attention: this step's query tokens against each request's paged context.

Data flow: `q [T, Hq, D]` is the flattened batch; request i owns query rows
`query_start_loc[i]:query_start_loc[i+1]` (query_len_i rows) and a context of
`seq_lens[i]` tokens that is already entirely in the paged cache — the cached prefix and
this step's own K/V, written beforehand by `kv_cache_write`. Query j of request i sits at
absolute position `seq_lens[i] - query_len_i + j` and attends causally to every context
token at or before it. One program handles (request, q head, BLOCK_M query rows): it loads
the `[BLOCK_M, D]` query tile and walks the context `BLOCK_N` tokens at a time (pages looked
up per token through `block_tables`): first, without masks, the tiles that lie wholly before
the tile's first query position, then the causal tiles up to its last one. It keeps an
online softmax in fp32 and stores `out [T, Hq, D]`. The same kernel therefore covers plain
prefill (empty prefix), prefix-cache hits and chunked prefill (long prefix, short query), and
decode rows (query_len 1) mixed into the batch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# (query rows per program, context tokens per inner iteration). Larger tiles on the GPU;
# smaller ones keep the CPU interpreter (tests) fast. The GPU test run covers the CUDA tiles.
CUDA_TILES = (64, 64)
INTERPRETER_TILES = (32, 32)
CUDA_NUM_WARPS, CUDA_NUM_STAGES = 4, 3
LOG2E = 1.4426950408889634


@triton.jit
def _attend_tile(
    q, acc, m_i, l_i,  # [M, D] query tile; running [M, D] output, [M] max and [M] sum (log2 domain)
    toks, q_pos, kv_end,  # [N] context positions of this tile; [M] query positions; context bound
    table_ptr, k_base, v_base, offs_d,
    stride_cblk, stride_coff, stride_cd, qk_scale,
    BLOCK_SIZE: tl.constexpr, MASKED: tl.constexpr, IEEE: tl.constexpr,
):
    """One online-softmax step over BLOCK_N context tokens read from the paged cache."""
    n_mask = toks < kv_end
    if MASKED:
        pages = tl.load(table_ptr + toks // BLOCK_SIZE, mask=n_mask, other=0)
    else:
        pages = tl.load(table_ptr + toks // BLOCK_SIZE)
    rows = pages.to(tl.int64) * stride_cblk + (toks % BLOCK_SIZE) * stride_coff  # [N]
    kv_offs = rows[:, None] + offs_d[None, :] * stride_cd  # [N, D]
    if MASKED:
        k = tl.load(k_base + kv_offs, mask=n_mask[:, None], other=0.0)  # [N, D]
        v = tl.load(v_base + kv_offs, mask=n_mask[:, None], other=0.0)
    else:
        k = tl.load(k_base + kv_offs)
        v = tl.load(v_base + kv_offs)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * qk_scale  # [M, N], log2 domain
    if MASKED:
        s = tl.where(n_mask[None, :] & (toks[None, :] <= q_pos[:, None]), s, float("-inf"))
    # Every row has seen a visible token by its first tile (token 0 or an unmasked tile), so m_new is finite.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])  # [M, N]
    if IEEE:
        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return acc * alpha[:, None] + pv, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _extend_kernel(
    q_ptr, cache_ptr, block_tables_ptr, query_start_loc_ptr, seq_lens_ptr, out_ptr,
    qk_scale,  # softmax scale * log2(e)
    stride_qt, stride_qh, stride_qd,
    stride_ckv, stride_cblk, stride_coff, stride_chead, stride_cd,
    stride_bt,
    stride_ot, stride_oh, stride_od,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):
    req = tl.program_id(0)
    head = tl.program_id(1)
    m_block = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    if m_block * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + req)
    prefix_len = seq_len - q_len  # context tokens cached before this step
    kv_head = head // GROUP

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # [M] row index within the request
    offs_d = tl.arange(0, HEAD_DIM)  # [D]
    offs_n = tl.arange(0, BLOCK_N)  # [N]
    m_mask = offs_m < q_len
    q_pos = prefix_len + offs_m  # [M] absolute positions
    q = tl.load(
        q_ptr + (q_start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :] * stride_qd,
        mask=m_mask[:, None], other=0.0,
    )  # [M, D]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    k_base = cache_ptr + kv_head * stride_chead
    v_base = k_base + stride_ckv
    table_ptr = block_tables_ptr + req * stride_bt
    # Tiles wholly before the first row's position are visible to every row: no mask there.
    # Then the causal tiles, up to the last valid row's position (never past seq_len).
    full_end = (prefix_len + m_block * BLOCK_M) // BLOCK_N * BLOCK_N
    kv_end = tl.minimum(seq_len, prefix_len + tl.minimum((m_block + 1) * BLOCK_M, q_len))
    for tile in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, tile + offs_n, q_pos, kv_end, table_ptr, k_base, v_base, offs_d,
            stride_cblk, stride_coff, stride_cd, qk_scale, BLOCK_SIZE, False, IEEE,
        )
    for tile in range(full_end, kv_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, tile + offs_n, q_pos, kv_end, table_ptr, k_base, v_base, offs_d,
            stride_cblk, stride_coff, stride_cd, qk_scale, BLOCK_SIZE, True, IEEE,
        )

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + (q_start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_d[None, :] * stride_od,
        out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None],
    )


def extend_attention(
    q: torch.Tensor,  # [T, Hq, D]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D], this step's K/V already written
    block_tables: torch.Tensor,  # [R, max_num_blocks] int32
    query_start_loc: torch.Tensor,  # [R + 1] int32
    seq_lens: torch.Tensor,  # [R] int32, context length after this step
    scale: float,
    max_query_len: int,
) -> torch.Tensor:  # [T, Hq, D]
    """Causal attention of each request's new tokens over its whole paged context.

    `max_query_len` (a host int) sizes the grid; it must be >= every request's query_len.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, cache_head_dim = kv_cache.shape
    num_requests = seq_lens.shape[0]
    if cache_head_dim != head_dim:
        raise ValueError(f"q head_dim {head_dim} != kv_cache head_dim {cache_head_dim}")
    if num_q_heads % num_kv_heads != 0:
        raise ValueError(f"num_q_heads {num_q_heads} must be a multiple of num_kv_heads {num_kv_heads}")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if query_start_loc.shape[0] != num_requests + 1:
        raise ValueError(
            f"query_start_loc has {query_start_loc.shape[0]} entries, expected num_requests + 1 = {num_requests + 1}"
        )
    out = torch.empty_like(q)
    if num_tokens == 0 or num_requests == 0 or max_query_len <= 0:
        return out
    block_m, block_n = CUDA_TILES if q.is_cuda else INTERPRETER_TILES
    grid = (num_requests, num_q_heads, triton.cdiv(max_query_len, block_m))
    _extend_kernel[grid](
        q, kv_cache, block_tables, query_start_loc, seq_lens, out,
        scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        *kv_cache.stride(),
        block_tables.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        GROUP=num_q_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_N=block_n, IEEE=q.dtype == torch.float32,
        num_warps=CUDA_NUM_WARPS, num_stages=CUDA_NUM_STAGES,
    )
    return out

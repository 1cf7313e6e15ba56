"""Extend / prefill attention: this step's query tokens against each request's paged context.

Data flow: `q [T, Hq, D]` is the flattened batch; request i owns query rows
`query_start_loc[i]:query_start_loc[i+1]` (query_len_i rows) and a context of
`seq_lens[i]` tokens that is already entirely in the paged cache — the cached prefix and
this step's own K/V, written beforehand by `kv_cache_write`. Query j of request i sits at
absolute position `seq_lens[i] - query_len_i + j` and attends causally to every context
token at or before it. The same kernel therefore covers plain prefill (empty prefix),
prefix-cache hits, chunked prefill (long prefix, short query) and decode rows mixed in; it
stores `out [T, Hq, D]`.

Work split: one program per *work item* — (request, block of BLOCK_Q query tokens) — and KV
head, taking every query head of that KV head's group at once (see `_extend_kernel`). Why a work
list: the grid is (W, Hkv) with W = ceil(T / BLOCK_Q) + min(R, T), a bound that depends only on
the tensor shapes, never on how tokens are split among requests; programs past the last real
item exit at once. So a CUDA graph captured for T tokens and R request slots replays correctly
for any mix of prefills and decodes that fits them (workers/runner/cuda_graphs.py).
`extend_work_items` builds the list on the device (no host sync), once per step for every layer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# (query rows per program = BLOCK_Q x padded group, context tokens per inner iteration). Larger
# tiles on the GPU; smaller ones keep the CPU interpreter (tests) fast.
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
    q_ptr, cache_ptr, block_tables_ptr, query_start_loc_ptr, seq_lens_ptr, work_ptr, out_ptr,
    num_requests, stride_work,
    qk_scale,  # softmax scale * log2(e)
    stride_qt, stride_qh, stride_qd,
    stride_ckv, stride_cblk, stride_coff, stride_chead, stride_cd,
    stride_bt,
    stride_ot, stride_oh, stride_od,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):
    """Tile: BLOCK_Q x GROUP_PAD rows (token-major, the query-head group padded to a power of two), so
    the K/V it walks are read once for the whole group and decode rows (query_len 1) cost one pass
    over the context per KV head, not one per query head. The program walks the context BLOCK_N
    tokens at a time (pages looked up per token through `block_tables`): first, without masks, the
    tiles wholly before the tile's first query position, then the causal tiles up to its last one,
    with an online softmax in fp32.
    """
    item = tl.program_id(0)
    kv_head = tl.program_id(1)
    req = tl.load(work_ptr + item)
    if req >= num_requests:  # past the last work item of this step
        return
    q_block = tl.load(work_ptr + stride_work + item)
    q_start = tl.load(query_start_loc_ptr + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + req)
    prefix_len = seq_len - q_len  # context tokens cached before this step

    rows = tl.arange(0, BLOCK_Q * GROUP_PAD)  # [M], token-major: row = token * GROUP_PAD + head in group
    first = q_block * BLOCK_Q
    tok = first + rows // GROUP_PAD  # [M] query token within the request
    head_in_group = rows % GROUP_PAD
    row_mask = (tok < q_len) & (head_in_group < GROUP)
    head = kv_head * GROUP + head_in_group  # [M] query head
    offs_d = tl.arange(0, HEAD_DIM)  # [D]
    offs_n = tl.arange(0, BLOCK_N)  # [N]
    q_pos = prefix_len + tok  # [M] absolute positions
    q_rows = (q_start + tok) * stride_qt + head * stride_qh  # [M]
    q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :] * stride_qd, mask=row_mask[:, None], other=0.0)

    m_i = tl.full([BLOCK_Q * GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q * GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    k_base = cache_ptr + kv_head * stride_chead
    v_base = k_base + stride_ckv
    table_ptr = block_tables_ptr + req * stride_bt
    # Tiles wholly before the first token's position are visible to every row: no mask there.
    # Then the causal tiles, up to the last valid token's position (never past seq_len).
    full_end = (prefix_len + first) // BLOCK_N * BLOCK_N
    kv_end = tl.minimum(seq_len, prefix_len + tl.minimum(first + BLOCK_Q, q_len))
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
    o_rows = (q_start + tok) * stride_ot + head * stride_oh
    tl.store(out_ptr + o_rows[:, None] + offs_d[None, :] * stride_od, out.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None])


def extend_block_q(num_q_heads: int, num_kv_heads: int, on_cuda: bool) -> int:
    """Query tokens per work item: the tile's rows divided by the padded GQA group."""
    rows = (CUDA_TILES if on_cuda else INTERPRETER_TILES)[0]
    group_pad = triton.next_power_of_2(num_q_heads // num_kv_heads)
    return max(1, rows // group_pad)


def extend_work_items(query_start_loc: torch.Tensor, num_tokens: int, block_q: int) -> torch.Tensor:
    """[2, W] int32 work list: (request, query block) per program; request == R past the end.

    W = ceil(num_tokens / block_q) + min(R, num_tokens) bounds sum_i ceil(query_len_i / block_q)
    for any split of num_tokens among R requests. Static shapes, no host sync (graph-safe).
    """
    num_requests = query_start_loc.shape[0] - 1
    width = -(-num_tokens // block_q) + min(num_requests, num_tokens)
    query_lens = (query_start_loc[1:] - query_start_loc[:-1]).long()  # [R]
    blocks = (query_lens + block_q - 1) // block_q  # [R]
    ends = blocks.cumsum(0)  # [R] inclusive
    items = torch.arange(width, device=query_start_loc.device)
    req = torch.searchsorted(ends, items, right=True)  # [W], R where items run out
    first = (ends - blocks).index_select(0, req.clamp(max=max(num_requests - 1, 0)))
    return torch.stack((req, items - first)).to(torch.int32)


def extend_attention(
    q: torch.Tensor,  # [T, Hq, D]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D], this step's K/V already written
    block_tables: torch.Tensor,  # [R, max_num_blocks] int32
    query_start_loc: torch.Tensor,  # [R + 1] int32
    seq_lens: torch.Tensor,  # [R] int32, context length after this step
    scale: float,
    work: torch.Tensor | None = None,  # [2, W] from extend_work_items, reused across layers
) -> torch.Tensor:  # [T, Hq, D]
    """Causal attention of each request's new tokens over its whole paged context.

    Rows of q that no request owns (padding past query_start_loc[R]) come back as zeros.
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
    out = torch.zeros_like(q)
    if num_tokens == 0 or num_requests == 0:
        return out
    group = num_q_heads // num_kv_heads
    block_q = extend_block_q(num_q_heads, num_kv_heads, q.is_cuda)
    if work is None:
        work = extend_work_items(query_start_loc, num_tokens, block_q)
    _, block_n = CUDA_TILES if q.is_cuda else INTERPRETER_TILES
    grid = (work.shape[1], num_kv_heads)
    _extend_kernel[grid](
        q, kv_cache, block_tables, query_start_loc, seq_lens, work, out,
        num_requests, work.stride(0),
        scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2),
        *kv_cache.stride(),
        block_tables.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        GROUP=group, GROUP_PAD=triton.next_power_of_2(group), BLOCK_Q=block_q, HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, BLOCK_N=block_n, IEEE=q.dtype == torch.float32,
        num_warps=CUDA_NUM_WARPS, num_stages=CUDA_NUM_STAGES,
    )
    return out

"""Paged decode attention: one new query token per request against its paged KV cache.

Data flow (split-K flash-decoding, GQA-aware): `q [B, Hq, D]` holds this step's query of
each of B requests. Each request's context of `seq_lens[b]` tokens is cut into
`num_splits` contiguous ranges. Stage 1 runs one program per (request, kv head, split): it
loads the `G = Hq // Hkv` query heads that share the kv head as one `[G, D]` tile (so each
K/V tile is read from HBM once for the whole group), walks its token range `BLOCK_N` tokens
at a time — each token's page found through `block_tables[b, t // block_size]` — and keeps
an online softmax. It writes its normalised partial output `[B, Hq, S, D]` and its
log-sum-exp (base 2) `[B, Hq, S]`, both fp32. Stage 2 runs one program per (request, q head)
and merges the S partials with weights `2 ** (lse_s - max lse)`. With one split (large
batches) stage 1 writes the output directly and stage 2 is not launched. Splits that hold no tokens
carry `lse = -inf` and weigh nothing; a request with `seq_len == 0` gets a zero output.

The number of splits grows as the batch shrinks, so that batch x kv heads x splits fills
the GPU, and is bounded so that every split still covers at least `MIN_TOKENS_PER_SPLIT`
tokens of the longest request. Pass `num_splits` to pin it (CUDA graphs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from shardserve.parallel.kernels.pdl import pdl_options, release_next, wait_for_previous

TARGET_PROGRAMS = 264  # about two waves of stage-1 programs on a 132-SM H100
MIN_TOKENS_PER_SPLIT = 128
MAX_SPLITS = 64
BLOCK_N = 64  # context tokens per inner iteration (spans several pages when block_size < 64)
LOG2E = 1.4426950408889634


def choose_num_splits(batch_size: int, num_kv_heads: int, max_seq_len: int) -> int:
    """Splits per request: enough programs to fill the device, never a split under 128 tokens."""
    wanted = triton.cdiv(TARGET_PROGRAMS, max(1, batch_size * num_kv_heads))
    by_length = triton.cdiv(max(1, max_seq_len), MIN_TOKENS_PER_SPLIT)
    return max(1, min(wanted, by_length, MAX_SPLITS))


@triton.jit
def _decode_stage1(
    q_ptr, cache_ptr, block_tables_ptr, seq_lens_ptr, part_out_ptr, part_lse_ptr,
    qk_scale,  # softmax scale * log2(e)
    num_splits,
    stride_qb, stride_qh, stride_qd,
    stride_ckv, stride_cblk, stride_coff, stride_chead, stride_cd,
    stride_bt,
    stride_pb, stride_ph, stride_ps,  # part_out [B, Hq, S, D]; last dim contiguous
    stride_lb, stride_lh,  # part_lse [B, Hq, S]; last dim contiguous
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
    DIRECT: tl.constexpr,  # one split: part_out is the final output [B, Hq, D] in q's dtype
    USE_PDL: tl.constexpr,
):
    wait_for_previous(USE_PDL)
    release_next(USE_PDL)
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    # Each split covers a whole number of BLOCK_N tiles.
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    offs_g = tl.arange(0, GROUP_PAD)  # [G_PAD]
    offs_d = tl.arange(0, HEAD_DIM)  # [D]
    offs_n = tl.arange(0, BLOCK_N)  # [N]
    heads = kv_head * GROUP + offs_g
    g_mask = offs_g < GROUP
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=g_mask[:, None], other=0.0,
    )  # [G_PAD, D]

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    k_base = cache_ptr + kv_head * stride_chead
    v_base = k_base + stride_ckv
    for tile in range(start, end, BLOCK_N):
        toks = tile + offs_n  # [N]
        n_mask = toks < end
        pages = tl.load(block_tables_ptr + b * stride_bt + toks // BLOCK_SIZE, mask=n_mask, other=0)
        rows = pages.to(tl.int64) * stride_cblk + (toks % BLOCK_SIZE) * stride_coff  # [N]
        kv_offs = rows[:, None] + offs_d[None, :] * stride_cd  # [N, D]
        k = tl.load(k_base + kv_offs, mask=n_mask[:, None], other=0.0)  # [N, D]
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(n_mask[None, :], s * qk_scale, float("-inf"))  # [G_PAD, N], log2 domain
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile has a valid token
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])  # [G_PAD, N]
        v = tl.load(v_base + kv_offs, mask=n_mask[:, None], other=0.0)  # [N, D]
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new

    nonempty = l_i > 0.0
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
    tl.store(
        part_out_ptr + b * stride_pb + heads[:, None] * stride_ph + split * stride_ps + offs_d[None, :],
        out.to(part_out_ptr.dtype.element_ty), mask=g_mask[:, None],
    )
    if not DIRECT:
        tl.store(part_lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=g_mask)


@triton.jit
def _decode_stage2(
    part_out_ptr, part_lse_ptr, out_ptr,
    num_splits,
    stride_pb, stride_ph, stride_ps,
    stride_lb, stride_lh,
    stride_ob, stride_oh, stride_od,
    HEAD_DIM: tl.constexpr, SPLITS_PAD: tl.constexpr, USE_PDL: tl.constexpr,
):
    wait_for_previous(USE_PDL)
    release_next(USE_PDL)
    b = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)  # [S_PAD]
    offs_d = tl.arange(0, HEAD_DIM)  # [D]
    s_mask = offs_s < num_splits
    lse = tl.load(part_lse_ptr + b * stride_lb + head * stride_lh + offs_s, mask=s_mask,
                  other=float("-inf"))  # [S_PAD]
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # seq_len == 0: all splits empty
    w = tl.exp2(lse - lse_max)  # [S_PAD], 0 for empty splits
    part = tl.load(
        part_out_ptr + b * stride_pb + head * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :],
        mask=(w > 0.0)[:, None], other=0.0,
    )  # [S_PAD, D]
    w_sum = tl.sum(w, 0)
    out = tl.sum(part * w[:, None], 0) / tl.where(w_sum > 0.0, w_sum, 1.0)  # [D]
    tl.store(out_ptr + b * stride_ob + head * stride_oh + offs_d * stride_od,
             out.to(out_ptr.dtype.element_ty))


def paged_decode_attention(
    q: torch.Tensor,  # [B, Hq, D]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # [B, max_num_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32, context length including the query token
    scale: float,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:  # [B, Hq, D]
    """Attention of one query token per request over its paged context (split-K, GQA-aware).

    `max_seq_len` (a host int) picks the number of splits without a device sync; `num_splits`
    pins it instead. Neither changes the result beyond float rounding.
    """
    num_seqs, num_q_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, cache_head_dim = kv_cache.shape
    if cache_head_dim != head_dim:
        raise ValueError(f"q head_dim {head_dim} != kv_cache head_dim {cache_head_dim}")
    if num_q_heads % num_kv_heads != 0:
        raise ValueError(f"num_q_heads {num_q_heads} must be a multiple of num_kv_heads {num_kv_heads}")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    group = num_q_heads // num_kv_heads
    out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    if num_splits is None:
        if max_seq_len is None:
            max_seq_len = int(seq_lens.max().item())
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_seq_len)
    if not 1 <= num_splits <= 1024:
        raise ValueError(f"num_splits must be in [1, 1024], got {num_splits}")

    direct = num_splits == 1 and out.stride(2) == 1  # stage 1 writes the output itself
    if direct:
        part_out, part_lse = out.unsqueeze(2), out  # [B, Hq, 1, D] view; no log-sum-exp needed
    else:  # [B, Hq, S, D] / [B, Hq, S] fp32 partial results of stage 1
        part_out = torch.empty(num_seqs, num_q_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(num_seqs, num_q_heads, num_splits, dtype=torch.float32, device=q.device)
    pdl = pdl_options(q.device)
    _decode_stage1[(num_seqs, num_kv_heads, num_splits)](
        q, kv_cache, block_tables, seq_lens, part_out, part_lse,
        scale * LOG2E,
        num_splits,
        q.stride(0), q.stride(1), q.stride(2),
        *kv_cache.stride(),
        block_tables.stride(0),
        part_out.stride(0), part_out.stride(1), part_out.stride(2),
        part_lse.stride(0), part_lse.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, BLOCK_N=BLOCK_N,
        IEEE=q.dtype == torch.float32, DIRECT=direct,
        num_warps=4, **pdl,
    )
    if direct:
        return out
    _decode_stage2[(num_seqs, num_q_heads)](
        part_out, part_lse, out,
        num_splits,
        part_out.stride(0), part_out.stride(1), part_out.stride(2),
        part_lse.stride(0), part_lse.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        HEAD_DIM=head_dim, SPLITS_PAD=triton.next_power_of_2(num_splits),
        num_warps=4, **pdl,
    )
    return out

"""MoE router in one Triton kernel: softmax over the experts -> top-k -> optional renormalisation.

Data flow: `router_logits [T, E]` (any float dtype) -> program t0 loads BLOCK_T rows as a fp32
[BLOCK_T, E_PAD] tile (padding experts -inf) -> row max m and the softmax denominator
`sum_e exp(l_e - m)` -> k rounds of (row max, lowest expert id reaching it, knock it out), so the
experts come out in descending order like `torch.topk` -> weights `exp(l - m) / denominator`
(softmax probabilities) or, with `renormalize`, `exp(l - m) / sum over the k picked` (the
probabilities renormalised to sum to 1; the full denominator cancels) -> stores
`topk_weights [T, k]` in `out_dtype` and `topk_ids [T, k]` int64, and with `expert_load` given
adds each pick to `expert_load[e]` (atomics; the model's load counter, no separate scatter).
Replaces the float cast, softmax, topk, sum, divide, dtype cast and scatter_add of the eager
router (`moe_reference.moe_route_reference`). Top-k on the logits equals top-k on the
probabilities since exp is monotonic; exact ties go to the lower expert id.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["num_tokens"])  # one compile for every batch size
def _moe_route_kernel(logits_ptr, weights_ptr, ids_ptr, load_ptr, num_tokens, num_experts, stride_lt,
                      TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                      RENORMALIZE: tl.constexpr, COUNT_LOAD: tl.constexpr):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_mask = tokens < num_tokens
    rows = tl.minimum(tokens, num_tokens - 1).to(tl.int64)  # tail programs re-read the last row: no NaN rows
    experts = tl.arange(0, E_PAD)
    logits = tl.load(logits_ptr + rows[:, None] * stride_lt + experts[None, :],
                     mask=(experts < num_experts)[None, :], other=float("-inf")).to(tl.float32)
    row_max = tl.max(logits, axis=1)
    denom = tl.sum(tl.exp(logits - row_max[:, None]), axis=1)

    slots = tl.arange(0, K_PAD)
    top_w = tl.zeros([BLOCK_T, K_PAD], dtype=tl.float32)
    top_i = tl.zeros([BLOCK_T, K_PAD], dtype=tl.int32)
    vals = logits
    for i in tl.static_range(TOP_K):
        best = tl.max(vals, axis=1)
        pick = tl.min(tl.where(vals == best[:, None], experts[None, :], E_PAD), axis=1)  # lowest id on ties
        top_w = tl.where(slots[None, :] == i, tl.exp(best - row_max)[:, None], top_w)
        top_i = tl.where(slots[None, :] == i, pick[:, None], top_i)
        vals = tl.where(experts[None, :] == pick[:, None], float("-inf"), vals)
        if COUNT_LOAD:
            # pick < num_experts only fails for NaN logits; never count outside the counter
            tl.atomic_add(load_ptr + pick, tl.full([BLOCK_T], 1, tl.int64), mask=token_mask & (pick < num_experts))
    if RENORMALIZE:
        top_w = top_w / tl.sum(top_w, axis=1)[:, None]  # padding slots hold 0
    else:
        top_w = top_w / denom[:, None]

    out_offs = tokens.to(tl.int64)[:, None] * TOP_K + slots[None, :]
    out_mask = token_mask[:, None] & (slots < TOP_K)[None, :]
    tl.store(weights_ptr + out_offs, top_w.to(weights_ptr.dtype.element_ty), mask=out_mask)
    tl.store(ids_ptr + out_offs, top_i.to(tl.int64), mask=out_mask)


SMALL_BATCH_TOKENS = 64  # up to here one token per program, one warp (decode)


def route_launch(num_tokens: int, num_experts: int) -> tuple[int, int]:
    """(tokens per program, warps) of the launch. Decode batches: one token per single-warp
    program, so the k rounds of row max / argmin reduce within a warp (shuffles) rather than
    across warps through shared memory, and the programs spread over the SMs; larger batches:
    [BLOCK_T, E_PAD] tiles of at most 2k fp32 over 4 warps."""
    e_pad = triton.next_power_of_2(num_experts)
    if num_tokens <= SMALL_BATCH_TOKENS:
        return 1, 1 if e_pad <= 256 else 4
    return max(1, min(64, 2048 // e_pad)), 4


def moe_route(router_logits: torch.Tensor, top_k: int, renormalize: bool, out_dtype: torch.dtype = torch.float32,
              expert_load: torch.Tensor | None = None, launch: tuple[int, int] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_weights [T, k] out_dtype, topk_ids [T, k] int64) of router_logits [T, E]; one launch.

    expert_load: optional int64 [E] counter, incremented by each token's k picks.
    launch: (tokens per program, warps) instead of `route_launch`'s (the GPU sweep).
    """
    num_tokens, num_experts = router_logits.shape
    if not 0 < top_k <= num_experts:
        raise ValueError(f"top_k must be in 1..{num_experts}, got {top_k}")
    if expert_load is not None and (expert_load.dtype != torch.int64 or expert_load.shape != (num_experts,)):
        raise ValueError(f"expert_load must be int64 [{num_experts}], got {expert_load.dtype} "
                         f"{tuple(expert_load.shape)}")
    device = router_logits.device
    weights = torch.empty(num_tokens, top_k, dtype=out_dtype, device=device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=device)
    if num_tokens == 0:
        return weights, ids
    if router_logits.stride(1) != 1:
        router_logits = router_logits.contiguous()
    block_t, num_warps = launch or route_launch(num_tokens, num_experts)
    _moe_route_kernel[(triton.cdiv(num_tokens, block_t),)](
        router_logits, weights, ids, ids if expert_load is None else expert_load,
        num_tokens, num_experts, router_logits.stride(0),
        TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k), E_PAD=triton.next_power_of_2(num_experts),
        BLOCK_T=block_t, RENORMALIZE=renormalize, COUNT_LOAD=expert_load is not None, num_warps=num_warps,
    )
    return weights, ids

"""Fused MoE: the alignment's invariants, the router kernel, and the grouped-GEMM path against
the torch reference.

Alignment (the Triton kernel `fused_moe` uses; test_moe_align.py compares it with the torch
version): every (token, slot) row routed to a local expert appears exactly once, in a block of
its expert; blocks hold one expert; padding is the sentinel T*k; rows of other ranks' experts
appear nowhere; the padded length fits the static buffer bound for any routing. Router
(`moe_route`): the ids, weights and load counts of softmax -> top-k -> renormalise in torch.
`fused_moe` is compared with `fused_moe_reference` and with the model's per-expert loop (fp32,
~1e-4), for all experts local, for an EP subset and for a batch large enough for the
multi-program alignment, and on both GEMM paths (aligned blocks, and one row per block without
alignment, which `use_direct_rows` picks for batch-1..4 decode). Small hidden sizes keep the
interpreter fast.
"""

from __future__ import annotations

import pytest
import torch
from shardserve.workers.kernels.fused_moe import (
    CUDA_TILE_BANDS,
    SMEM_BUDGET_BYTES,
    fit_shared_memory,
    fused_moe,
    moe_align_block_size,
    moe_tiles,
    padded_length,
    use_direct_rows,
)
from shardserve.workers.kernels.moe_reference import fused_moe_reference, moe_route_reference
from shardserve.workers.kernels.moe_routing import moe_route

HIDDEN, INTER = 64, 32


def _routing(num_tokens: int, num_experts: int, top_k: int, device: torch.device
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct experts per token (as top-k gives) and weights: ([T, k] int64, [T, k] float32)."""
    ids = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(num_tokens)]).to(device)
    weights = torch.rand(num_tokens, top_k, device=device)
    return ids, weights


@pytest.mark.parametrize("num_tokens", [1, 3, 17, 64])
@pytest.mark.parametrize("num_experts,top_k", [(4, 1), (8, 2), (8, 8)])
@pytest.mark.parametrize("block_m", [4, 16])
@pytest.mark.parametrize("local", ["all", "ep_subset"])
def test_align_invariants(device, num_tokens, num_experts, top_k, block_m, local):
    start, num_local = (0, num_experts) if local == "all" else (1, num_experts // 2)
    ids, _ = _routing(num_tokens, num_experts, top_k, device)
    sorted_ids, expert_ids, num_post = moe_align_block_size(ids, block_m, start, num_local)
    num_rows = num_tokens * top_k
    length = padded_length(num_rows, num_local, block_m)
    assert sorted_ids.shape == (length,) and sorted_ids.dtype == torch.int32
    assert expert_ids.shape == (length // block_m,) and num_post.shape == (1,)
    assert length <= -(-(num_rows + num_experts * (block_m - 1)) // block_m) * block_m

    flat = ids.reshape(-1).cpu()
    local_id = flat - start
    is_local = (local_id >= 0) & (local_id < num_local)
    sorted_ids, expert_ids, used = sorted_ids.cpu(), expert_ids.cpu(), int(num_post)
    counts = torch.bincount(local_id[is_local], minlength=num_local)
    assert used == int(((counts + block_m - 1) // block_m * block_m).sum()) and used % block_m == 0
    real = sorted_ids[sorted_ids != num_rows]
    assert sorted(real.tolist()) == torch.arange(num_rows)[is_local].tolist()  # local rows once each
    assert (sorted_ids[used:] == num_rows).all()  # only the sentinel past the used length
    for b in range(length // block_m):
        block = sorted_ids[b * block_m:(b + 1) * block_m]
        if b * block_m >= used:
            assert expert_ids[b] == -1
            continue
        rows = block[block != num_rows].long()
        assert rows.numel() > 0  # a group's padding never fills a whole block
        assert (local_id[rows] == expert_ids[b]).all()  # one expert per block
        assert (rows.diff() > 0).all()  # stable: rows of an expert keep their order


@pytest.mark.parametrize("num_tokens", [1, 3, 17])
@pytest.mark.parametrize("num_experts", [4, 8])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("local", ["all", "ep_upper_half", "ep_middle"])
def test_fused_moe_matches_reference(device, num_tokens, num_experts, top_k, local):
    start, num_local = {"all": (0, num_experts), "ep_upper_half": (num_experts // 2, num_experts // 2),
                        "ep_middle": (1, 2)}[local]
    x = torch.randn(num_tokens, HIDDEN, device=device)
    w13 = torch.randn(num_local, 2 * INTER, HIDDEN, device=device) * 0.2
    w2 = torch.randn(num_local, HIDDEN, INTER, device=device) * 0.2
    ids, weights = _routing(num_tokens, num_experts, top_k, device)
    out = fused_moe(x, w13, w2, weights, ids, start, num_local)
    assert out.shape == (num_tokens, HIDDEN) and out.dtype == torch.float32
    want = fused_moe_reference(x, w13, w2, weights, ids, start, num_local)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(1, 16, 8), (2, 64, 4), (5, 8, 2)])
@pytest.mark.parametrize("local", ["all", "ep_upper_half"])
@pytest.mark.parametrize("direct", [True, False])
def test_fused_moe_direct_and_aligned_paths(device, num_tokens, num_experts, top_k, local, direct):
    start, num_local = (0, num_experts) if local == "all" else (num_experts // 2, num_experts // 2)
    x = torch.randn(num_tokens, HIDDEN, device=device)
    w13 = torch.randn(num_local, 2 * INTER, HIDDEN, device=device) * 0.2
    w2 = torch.randn(num_local, HIDDEN, INTER, device=device) * 0.2
    ids, weights = _routing(num_tokens, num_experts, top_k, device)
    if num_tokens == 5:  # repeated experts across tokens: direct rows read an expert more than once
        ids[1] = ids[0]
    out = fused_moe(x, w13, w2, weights, ids, start, num_local, direct=direct)
    want = fused_moe_reference(x, w13, w2, weights, ids, start, num_local)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)


def test_direct_rows_only_while_experts_rarely_repeat():
    assert use_direct_rows(8, 8, 128) and use_direct_rows(32, 8, 128)  # Qwen3-30B-A3B decode, batch 1 and 4
    assert not use_direct_rows(64, 8, 128)  # batch 8: aligned blocks share expert reads
    assert use_direct_rows(2, 2, 8) and not use_direct_rows(4, 2, 8)  # Mixtral: batch 1 only
    assert use_direct_rows(8, 8, 64)  # EP half: one token's rows are distinct experts anyway


def test_fused_moe_multi_program_alignment(device):
    # 600 rows: the alignment runs as count + align launches over several programs
    x = torch.randn(150, HIDDEN, device=device)
    w13 = torch.randn(6, 2 * INTER, HIDDEN, device=device) * 0.2
    w2 = torch.randn(6, HIDDEN, INTER, device=device) * 0.2
    ids, weights = _routing(150, 8, 4, device)
    out = fused_moe(x, w13, w2, weights, ids, 1, 6)
    torch.testing.assert_close(out, fused_moe_reference(x, w13, w2, weights, ids, 1, 6), atol=1e-4, rtol=1e-4)


def test_fused_moe_odd_sizes_and_float16(device):
    # hidden 48 / inter 40: K and N not multiples of the tiles; fp16 operands, fp32 accumulation
    x = torch.randn(5, 48, device=device).half()
    w13 = (torch.randn(3, 80, 48, device=device) * 0.2).half()
    w2 = (torch.randn(3, 48, 40, device=device) * 0.2).half()
    ids, weights = _routing(5, 3, 2, device)
    out = fused_moe(x, w13, w2, weights.half(), ids)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, fused_moe_reference(x, w13, w2, weights, ids), atol=5e-3, rtol=5e-3)


def test_fused_moe_equals_model_expert_loop(device):
    """The CPU expert loop of FusedExperts and the kernel path agree on the same weights."""
    from shardserve.workers.models.moe import FusedExperts

    experts = FusedExperts(num_experts=6, hidden_size=HIDDEN, intermediate_size=INTER, dtype=torch.float32)
    with torch.no_grad():
        experts.w13_weight.normal_(0.0, 0.2)
        experts.w2_weight.normal_(0.0, 0.2)
    x = torch.randn(9, HIDDEN)
    ids, weights = _routing(9, 6, 2, torch.device("cpu"))
    loop = experts(x, ids, weights)  # CPU tensors: the Python loop
    fused = fused_moe(*(t.to(device) for t in (x, experts.w13_weight, experts.w2_weight, weights, ids)))
    torch.testing.assert_close(fused.cpu(), loop, atol=1e-4, rtol=1e-4)


def test_fused_moe_empty_batch_and_bad_shapes(device):
    w13 = torch.randn(2, 2 * INTER, HIDDEN, device=device)
    w2 = torch.randn(2, HIDDEN, INTER, device=device)
    empty = torch.empty(0, 2, dtype=torch.long, device=device)
    out = fused_moe(torch.randn(0, HIDDEN, device=device), w13, w2, empty.float(), empty)
    assert out.shape == (0, HIDDEN)
    with pytest.raises(ValueError, match="do not match"):
        fused_moe(torch.randn(1, HIDDEN, device=device), w13, w2[:, :, :8], torch.ones(1, 1, device=device),
                  torch.zeros(1, 1, dtype=torch.long, device=device))


def test_tiles_fit_shared_memory_for_every_operand_size():
    """The tuned bf16 bands stay as they are; fp32 operands (a model run in float32 on a GPU)
    get fewer pipeline stages instead of a config that cannot compile (compiled on an H100, the
    largest band with fp32 failed before this)."""
    def staged(t, size):
        return (t.block_m * t.block_k + t.block_k * t.block_n) * size * t.num_stages

    for _, tiles in CUDA_TILE_BANDS:
        assert fit_shared_memory(tiles, 2) == tiles
        fp32 = fit_shared_memory(tiles, 4)
        assert staged(fp32, 4) <= SMEM_BUDGET_BYTES and fp32.num_stages >= 1
        assert fp32.block_m == tiles.block_m and fp32.block_n == tiles.block_n
    assert moe_tiles(2048 * 8, 128, on_cuda=True, element_size=4).num_stages < \
        moe_tiles(2048 * 8, 128, on_cuda=True).num_stages


def test_tiles_grow_with_rows_per_expert():
    decode, prefill = moe_tiles(8, 128, on_cuda=True), moe_tiles(2048 * 8, 128, on_cuda=True)
    assert decode.block_m == 16 and prefill.block_m > decode.block_m
    bounds = [bound for bound, _ in CUDA_TILE_BANDS]
    assert bounds == sorted(bounds) and bounds[-1] == float("inf")  # every batch finds a band
    for tiles in (decode, prefill, moe_tiles(4, 4, on_cuda=False), *(t for _, t in CUDA_TILE_BANDS)):
        assert min(tiles.block_m, tiles.block_n, tiles.block_k) >= 16  # tl.dot's minimum
        assert tiles.block_m & (tiles.block_m - 1) == 0  # the alignment kernel needs a power of two


# up to 64 tokens: one token per single-warp program; 100: [BLOCK_T, E] tiles (route_launch)
@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(1, 128, 8), (37, 128, 8), (20, 60, 4), (9, 8, 2),
                                                          (5, 256, 8), (4, 6, 1), (3, 16, 6), (100, 128, 8)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_route_matches_torch(device, num_tokens, num_experts, top_k, renormalize):
    logits = torch.randn(num_tokens, num_experts, device=device) * 2  # fp32: no ties
    load = torch.full((num_experts,), 5, dtype=torch.int64, device=device)
    weights, ids = moe_route(logits, top_k, renormalize, torch.float32, load)
    want_w, want_ids = moe_route_reference(logits, top_k, renormalize)
    assert ids.dtype == torch.int64 and weights.shape == (num_tokens, top_k)
    assert torch.equal(ids, want_ids)  # same experts, same (descending) order
    torch.testing.assert_close(weights, want_w, atol=1e-6, rtol=1e-5)  # GPU exp is approximate (~ulps)
    assert torch.equal(load.cpu() - 5, torch.bincount(want_ids.reshape(-1).cpu(), minlength=num_experts))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_route_low_precision_logits(device, dtype):
    # Low-precision logits tie often; a tie may pick either expert, so compare the picked logits.
    logits = (torch.randn(40, 64, device=device) * 2).to(dtype)
    weights, ids = moe_route(logits, 8, True, dtype)
    want_w, want_ids = moe_route_reference(logits, 8, True, dtype)
    assert weights.dtype == dtype
    assert torch.equal(logits.gather(1, ids), logits.gather(1, want_ids))
    assert (ids.sort(1).values.diff(dim=1) > 0).all()  # k distinct experts per token
    ulp = {torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]  # fp32 math may round either way once
    torch.testing.assert_close(weights, want_w, atol=0, rtol=2 * ulp)


def test_route_strided_logits_and_bad_args(device):
    logits = torch.randn(6, 20, device=device)[:, :16]  # row stride 20
    weights, ids = moe_route(logits, 2, False)
    want_w, want_ids = moe_route_reference(logits, 2, False)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_w, atol=1e-6, rtol=1e-5)  # GPU exp is approximate (~ulps)
    with pytest.raises(ValueError, match="top_k"):
        moe_route(logits, 17, False)
    with pytest.raises(ValueError, match="expert_load"):
        moe_route(logits, 2, False, expert_load=torch.zeros(16, dtype=torch.int32, device=device))


@pytest.mark.parametrize("renormalize", [True, False])
def test_moe_block_kernel_path_equals_torch_path(device, monkeypatch, renormalize):
    """SparseMoeBlock with the router kernel + fused_moe equals its torch router + expert loop,
    routing-weight dtype and expert_load counts included."""
    from shardserve.workers.models import moe

    block = moe.SparseMoeBlock(HIDDEN, 16, 4, INTER, renormalize=renormalize, dtype=torch.float32).to(device)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0.0, 0.2)
    x = torch.randn(11, HIDDEN, device=device)
    monkeypatch.setattr(moe, "use_kernels", lambda t: False)
    want = block(x)
    want_load = block.expert_load.clone()
    monkeypatch.setattr(moe, "use_kernels", lambda t: True)  # CPU: the kernels run in the interpreter
    got = block(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(block.expert_load, 2 * want_load)

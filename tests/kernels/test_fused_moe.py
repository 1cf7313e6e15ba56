"""Fused MoE: the alignment's invariants, and the grouped-GEMM path against the torch reference.

Alignment: every (token, slot) row routed to a local expert appears exactly once, in a block of
its expert; blocks hold one expert; padding is the sentinel T*k; rows of other ranks' experts
appear nowhere; the padded length fits the static buffer bound for any routing. `fused_moe` is
compared with `fused_moe_reference` and with the model's per-expert loop (fp32, ~1e-4), for
all experts local and for an EP subset. Small hidden sizes keep the interpreter fast.
"""

from __future__ import annotations

import pytest
import torch
from shardserve.workers.kernels.fused_moe import fused_moe, moe_align_block_size, moe_tiles, padded_length
from shardserve.workers.kernels.moe_reference import fused_moe_reference

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


def test_tiles_grow_with_rows_per_expert():
    decode, prefill = moe_tiles(8, 128, on_cuda=True), moe_tiles(2048 * 8, 128, on_cuda=True)
    assert decode.block_m == 16 and prefill.block_m == 64
    for tiles in (decode, prefill, moe_tiles(4, 4, on_cuda=False)):
        assert min(tiles.block_m, tiles.block_n, tiles.block_k) >= 16  # tl.dot's minimum

"""Triton MoE alignment (`moe_align.moe_align_block_size`) against the torch reference.

`expert_ids` and `num_tokens_post_padded` must match exactly; `sorted_token_ids` must hold the
same rows (and padding sentinels) within each expert's group, in any order: the grouped GEMM
computes every row on its own, so the order inside a group cannot change the result. Covered:
several T, k, E and BLOCK_M, int32 / int64 ids, EP ranges (lower, upper, middle, a single
expert, none of the routed experts local), all rows on one expert, the one-program path (decode)
and the count + align path, also with several row chunks per program.
"""

from __future__ import annotations

import pytest
import torch
from shardserve.workers.kernels import moe_align
from shardserve.workers.kernels.moe_align import moe_align_block_size, padded_length
from shardserve.workers.kernels.moe_reference import moe_align_block_size_torch


def _routing(num_tokens: int, num_experts: int, top_k: int) -> torch.Tensor:
    """[T, k] int64: distinct experts per token (as top-k gives)."""
    return torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(num_tokens)]).reshape(num_tokens, top_k)


def _assert_same_alignment(topk_ids: torch.Tensor, block_m: int, start: int, num_local: int,
                           device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    got = [t.cpu() for t in moe_align_block_size(topk_ids.to(device), block_m, start, num_local)]
    want = moe_align_block_size_torch(topk_ids, block_m, start, num_local)
    sorted_ids, expert_ids, num_post = got
    num_rows = topk_ids.numel()
    length = padded_length(num_rows, num_local, block_m)
    assert sorted_ids.dtype == expert_ids.dtype == num_post.dtype == torch.int32
    assert sorted_ids.shape == (length,) and expert_ids.shape == (length // block_m,) and num_post.shape == (1,)
    assert torch.equal(num_post, want[2])
    assert torch.equal(expert_ids, want[1])
    used = int(num_post)
    assert (sorted_ids[used:] == num_rows).all()
    for e in expert_ids.unique().tolist():
        if e < 0:
            continue
        blocks = (expert_ids == e).nonzero().squeeze(1)
        lo, hi = int(blocks[0]) * block_m, (int(blocks[-1]) + 1) * block_m  # a group is contiguous
        assert blocks.numel() * block_m == hi - lo
        assert sorted(sorted_ids[lo:hi].tolist()) == sorted(want[0][lo:hi].tolist()), f"expert {e}"
    return sorted_ids, expert_ids, num_post


@pytest.mark.parametrize("num_tokens", [1, 5, 33, 160])
@pytest.mark.parametrize("num_experts,top_k", [(4, 1), (8, 2), (16, 8), (128, 8)])
@pytest.mark.parametrize("block_m", [16, 64])
def test_align_matches_torch_all_local(device, num_tokens, num_experts, top_k, block_m):
    _assert_same_alignment(_routing(num_tokens, num_experts, top_k), block_m, 0, num_experts, device)


@pytest.mark.parametrize("start,num_local", [(0, 8), (8, 8), (5, 3), (15, 1)])
@pytest.mark.parametrize("num_tokens", [3, 70])
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_align_matches_torch_expert_parallel(device, start, num_local, num_tokens, id_dtype):
    ids = _routing(num_tokens, 16, 4).to(id_dtype)
    _assert_same_alignment(ids, 16, start, num_local, device)


def test_align_no_local_rows(device):
    ids = _routing(40, 8, 2)  # experts 0..7; this rank holds 8..15
    sorted_ids, expert_ids, num_post = _assert_same_alignment(ids, 16, 8, 8, device)
    assert int(num_post) == 0 and (expert_ids == -1).all() and (sorted_ids == ids.numel()).all()


@pytest.mark.parametrize("num_tokens", [1, 17, 300])
def test_align_all_rows_one_expert(device, num_tokens):
    ids = torch.full((num_tokens, 2), 3, dtype=torch.long)
    sorted_ids, expert_ids, num_post = _assert_same_alignment(ids, 16, 0, 8, device)
    assert int(num_post) == -(-2 * num_tokens // 16) * 16 and (expert_ids[expert_ids >= 0] == 3).all()
    assert torch.equal(sorted_ids[:2 * num_tokens], torch.arange(2 * num_tokens, dtype=torch.int32))


def test_align_many_chunks_per_program(device, monkeypatch):
    # Few programs, each walking several row chunks: the per-program running offsets.
    monkeypatch.setattr(moe_align, "MAX_PROGRAMS", 3)
    _assert_same_alignment(_routing(500, 12, 4), 16, 2, 9, device)


def test_align_stable_within_groups(device):
    # The kernel keeps flat row order inside each group: identical to the stable torch sort.
    ids = _routing(200, 16, 4)
    got = moe_align_block_size(ids.to(device), 32, 0, 16)
    for g, w in zip(got, moe_align_block_size_torch(ids, 32, 0, 16), strict=True):
        assert torch.equal(g.cpu(), w)


def test_align_empty_batch(device):
    sorted_ids, expert_ids, num_post = moe_align_block_size(torch.empty(0, 2, dtype=torch.long, device=device),
                                                            16, 0, 4)
    assert sorted_ids.numel() == 0 and expert_ids.numel() == 0 and int(num_post) == 0

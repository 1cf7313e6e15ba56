"""The fused CPU decode ops (decode_ops.cpp) against the torch reference paths they replace.

Each op runs on random float32 inputs shaped like a small decode step (and a short extend chunk for
attention) and is compared with what the eager torch code computes: RMSNorm's `_norm`, the
rotate-half rope plus `write_kv_cache`, the torch reference attention backend, F.silu(gate) * up.
Also: the lossless Q8_0 re-derivation of a float LM head (cpu_head.py) and its logits.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from shardserve.workers.attention.cpu_backend import CpuAttentionBackend
from shardserve.workers.attention.metadata import AttentionMetadata
from shardserve.workers.attention.torch_ref import TorchAttentionBackend, write_kv_cache
from shardserve.workers.models.layers import RMSNorm, RotaryEmbedding, _rotate
from shardserve.workers.quant.cpu_kernels import PackedQ8, q8_linear
from shardserve.workers.quant.cpu_kernels.decode_ops import ops

pytestmark = pytest.mark.skipif(ops() is None, reason="the CPU decode ops extension did not build here")
GEN = torch.Generator().manual_seed(0)


def rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN)


@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_torch(with_residual: bool) -> None:
    norm = RMSNorm(576, 1e-5)
    norm.weight.copy_(rand(576))
    x, residual = rand(3, 576), rand(3, 576) if with_residual else None
    out, stream = ops().rms_norm(x, residual, norm.weight, norm.eps)
    want_stream = x + residual if with_residual else x
    torch.testing.assert_close(out, norm._norm(want_stream), rtol=1e-5, atol=1e-5)
    if with_residual:
        assert torch.equal(stream, want_stream)
    fused = norm(x, residual)  # the module takes the fused op on CPU
    torch.testing.assert_close(fused[0] if with_residual else fused, norm._norm(want_stream), rtol=1e-5, atol=1e-5)


def test_rotary_and_kv_write_match_torch() -> None:
    heads, kv_heads, d, tokens = 9, 3, 64, 5
    rope = RotaryEmbedding(d, {"rope_theta": 100000.0, "rope_type": "default"})
    qkv = rand(tokens, (heads + 2 * kv_heads) * d)  # q, k, v are strided views into it, as in LlamaAttention
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    q, k, v = (t.reshape(tokens, -1, d) for t in (q, k, v))
    positions = torch.tensor([0, 7, 8, 300, 4095])
    slots = torch.tensor([3, 17, 18, 40, 1])
    cos_sin = positions.float()[:, None] * rope.inv_freq[None, :]
    cos, sin = cos_sin.cos().repeat(1, 2)[:, None, :], cos_sin.sin().repeat(1, 2)[:, None, :]
    want_q, want_k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    want_cache = torch.full((2, 6, 8, kv_heads, d), float("nan"))
    write_kv_cache(want_k, v, want_cache, slots)
    cache = torch.full((2, 6, 8, kv_heads, d), float("nan"))
    got_q, got_k, written = rope(positions, q, k, kv_write=(v, cache, slots))
    assert written
    torch.testing.assert_close(got_q, want_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_k, want_k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache, want_cache, rtol=1e-5, atol=1e-5, equal_nan=True)


def _metadata(query_lens: list[int], seq_lens: list[int], block_tables: torch.Tensor, block_size: int
              ) -> AttentionMetadata:
    starts = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    slots = []
    for i, (q_len, s_len) in enumerate(zip(query_lens, seq_lens, strict=True)):
        for pos in range(s_len - q_len, s_len):
            slots.append(int(block_tables[i, pos // block_size]) * block_size + pos % block_size)
    return AttentionMetadata(num_tokens=sum(query_lens), num_requests=len(query_lens), query_start_loc=starts,
                             seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=block_tables,
                             slot_mapping=torch.tensor(slots), max_query_len=max(query_lens),
                             max_seq_len=max(seq_lens), query_lens_cpu=query_lens, seq_lens_cpu=seq_lens)


@pytest.mark.parametrize("query_lens, seq_lens", [([1], [37]), ([1, 1, 6], [5, 70, 21])])
def test_paged_attention_matches_torch_reference(query_lens: list[int], seq_lens: list[int]) -> None:
    heads, kv_heads, d, block_size, num_blocks = 9, 3, 64, 16, 24
    perm = torch.randperm(num_blocks, generator=GEN).to(torch.int32)
    block_tables = perm[: 3 * len(seq_lens)].reshape(len(seq_lens), 3).contiguous()  # up to 48 tokens each
    block_tables = torch.cat([block_tables, perm[-2:].repeat(len(seq_lens), 1)], dim=1).contiguous()
    meta = _metadata(query_lens, seq_lens, block_tables, block_size)
    cache = rand(2, num_blocks, block_size, kv_heads, d)
    tokens = sum(query_lens)
    q, k, v = rand(tokens, heads, d), rand(tokens, kv_heads, d), rand(tokens, kv_heads, d)
    want_cache = cache.clone()
    want = TorchAttentionBackend().forward(q, k, v, want_cache, meta, d**-0.5)
    got = CpuAttentionBackend().forward(q, k, v, cache, meta, d**-0.5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert torch.equal(cache, want_cache)


def test_silu_mul_matches_torch() -> None:
    x = rand(2, 2 * 1536) * 4
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(ops().silu_mul(x), F.silu(gate) * up, rtol=1e-5, atol=1e-6)


def test_exact_q8_blocks_are_recovered_from_floats_and_others_refused() -> None:
    q = torch.randint(-127, 128, (64, 96), generator=GEN, dtype=torch.int8)
    q[:, ::32] = 127  # each block's largest magnitude is 127, as Q8_0 quantization makes it
    d = (torch.rand(64, 3, generator=GEN) * 0.01).half().float()
    d[5, 1] = 0.0  # an all-zero block (vocab padding rows are all zero)
    q[5, 32:64] = 0
    w = PackedQ8.from_blocks(q, d).dequantize()
    packed = PackedQ8.from_exact_float(w)
    assert packed is not None and torch.equal(packed.dequantize(), w)
    x = rand(2, 96)
    torch.testing.assert_close(q8_linear(x, packed), F.linear(x, w), rtol=1e-5, atol=1e-5)
    assert PackedQ8.from_exact_float(rand(64, 96)) is None  # plain floats: not blocks, keep F.linear

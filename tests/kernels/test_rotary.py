"""Neox-style rotary embedding kernel vs its torch reference and HF's rotate_half formula."""

from __future__ import annotations

import pytest
import torch
from kernel_env import ELEMENTWISE_DTYPES
from shardserve.workers.kernels import reference
from shardserve.workers.kernels.rotary import rotary_embedding

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1.6e-2, 2**-6)}  # bf16: two ulps (interpreter casts truncate)


def _cos_sin(max_position: int, rotary_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
    freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)  # [max_pos, R/2]
    return freqs.cos(), freqs.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


@pytest.mark.parametrize("dtype", ELEMENTWISE_DTYPES)
@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim,rotary_dim", [(4, 4, 32, 32), (8, 2, 64, 64), (3, 1, 64, 32)])
def test_rotary_matches_reference(device, dtype, num_q_heads, num_kv_heads, head_dim, rotary_dim):
    cos, sin = (c.to(device) for c in _cos_sin(300, rotary_dim))
    q = torch.randn(9, num_q_heads, head_dim).to(dtype=dtype, device=device)
    k = torch.randn(9, num_kv_heads, head_dim).to(dtype=dtype, device=device)
    positions = torch.tensor([0, 1, 2, 17, 18, 100, 255, 299, 5], device=device)
    out_q, out_k = rotary_embedding(q, k, positions, cos, sin, inplace=False)
    ref_q, ref_k = reference.rotary_embedding(q, k, positions, cos, sin, inplace=False)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out_q, ref_q, atol=atol, rtol=rtol)
    torch.testing.assert_close(out_k, ref_k, atol=atol, rtol=rtol)
    if rotary_dim < head_dim:  # the tail of each head passes through untouched
        assert torch.equal(out_q[..., rotary_dim:], q[..., rotary_dim:])


def test_rotary_equals_hf_apply_rotary_pos_emb_in_place(device):
    cos, sin = (c.to(device) for c in _cos_sin(64, 32))
    qkv = torch.randn(6, (4 + 2 + 2) * 32, device=device)  # q, k as strided views of a fused projection
    q, k = qkv[:, : 4 * 32].view(6, 4, 32), qkv[:, 4 * 32 : 6 * 32].view(6, 2, 32)
    q0, k0 = q.clone(), k.clone()
    positions = torch.tensor([3, 0, 63, 7, 7, 30], device=device)
    out_q, out_k = rotary_embedding(q, k, positions, cos, sin)
    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()
    cos_full = torch.cat([cos, cos], -1)[positions][:, None]  # [T, 1, D], HF's emb = cat(freqs, freqs)
    sin_full = torch.cat([sin, sin], -1)[positions][:, None]
    torch.testing.assert_close(q, q0 * cos_full + _rotate_half(q0) * sin_full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, k0 * cos_full + _rotate_half(k0) * sin_full, atol=1e-5, rtol=1e-5)
    assert torch.equal(qkv[:, 6 * 32 :], qkv[:, 6 * 32 :].clone())  # v part of the buffer
    torch.testing.assert_close(q.norm(dim=-1), q0.norm(dim=-1))  # a rotation keeps norms


def test_rotary_rejects_mismatched_cache(device):
    q, k = torch.randn(2, 2, 16, device=device), torch.randn(2, 1, 16, device=device)
    with pytest.raises(ValueError, match="cos/sin"):
        rotary_embedding(q, k, torch.zeros(2, dtype=torch.long, device=device),
                         torch.ones(8, 8, device=device), torch.ones(8, 4, device=device))


@pytest.mark.parametrize("dtype", ELEMENTWISE_DTYPES)
def test_rotary_with_kv_write_equals_rotary_then_kv_cache_write(device, dtype):
    from shardserve.workers.kernels.kv_cache_write import kv_cache_write

    cos, sin = (c.to(device) for c in _cos_sin(64, 32))
    qkv = torch.randn(5, (4 + 2 * 2) * 32).to(dtype=dtype, device=device)  # a fused projection's output
    q, k, v = (t.view(5, -1, 32) for t in qkv.split([4 * 32, 2 * 32, 2 * 32], dim=-1))
    positions = torch.tensor([3, 9, 10, 40, 63], device=device)
    slots = torch.tensor([5, 17, -1, 0, 30], device=device)  # -1: a padding token, skipped
    fused_cache = torch.zeros(2, 8, 4, 2, 32, dtype=dtype, device=device)
    plain_cache = fused_cache.clone()
    fq, fk = rotary_embedding(q.clone(), k.clone(), positions, cos, sin, kv_write=(v, fused_cache, slots))
    pq, pk = rotary_embedding(q.clone(), k.clone(), positions, cos, sin)
    kv_cache_write(pk, v, plain_cache, slots)
    assert torch.equal(fq, pq) and torch.equal(fk, pk)
    assert torch.equal(fused_cache, plain_cache)
    assert torch.count_nonzero(fused_cache) > 0


@pytest.mark.parametrize("dtype", ELEMENTWISE_DTYPES)
def test_rotary_with_qk_norm_equals_norm_then_rotary(device, dtype):
    """Qwen3's per-head q/k RMSNorm fused in front of the rotation = rmsnorm per head, then rotary."""
    cos, sin = (c.to(device) for c in _cos_sin(64, 32))
    qkv = (torch.randn(5, (4 + 2 * 2) * 32) * 3).to(dtype=dtype, device=device)
    q, k, _ = (t.view(5, -1, 32) for t in qkv.split([4 * 32, 2 * 32, 2 * 32], dim=-1))
    q_w = (torch.rand(32) + 0.5).to(dtype=dtype, device=device)
    k_w = (torch.rand(32) + 0.5).to(dtype=dtype, device=device)
    positions = torch.tensor([3, 9, 10, 40, 63], device=device)
    eps = 1e-6
    out_q, out_k = rotary_embedding(q, k, positions, cos, sin, inplace=False, qk_norm=(q_w, k_w, eps))
    normed_q = reference.rmsnorm(q.reshape(-1, 32), q_w, eps)[0].view_as(q)
    normed_k = reference.rmsnorm(k.reshape(-1, 32), k_w, eps)[0].view_as(k)
    ref_q, ref_k = reference.rotary_embedding(normed_q, normed_k, positions, cos, sin, inplace=False)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out_q, ref_q, atol=atol, rtol=rtol)
    torch.testing.assert_close(out_k, ref_k, atol=atol, rtol=rtol)
    assert not torch.allclose(out_q.float(), reference.rotary_embedding(q, k, positions, cos, sin, inplace=False)[0].float(),
                              atol=atol, rtol=rtol)  # the norm did something
    with pytest.raises(ValueError, match="qk_norm"):
        rotary_embedding(q, k, positions, cos[:, :8], sin[:, :8], qk_norm=(q_w, k_w, eps))  # partial rotary


def test_attention_qk_norm_kernel_path_equals_torch_path(device, monkeypatch):
    """RotaryEmbedding with Qwen3's q/k norms: the fused kernel path equals the torch modules."""
    from shardserve.workers.models import layers

    rope = layers.RotaryEmbedding(32, {"rope_theta": 10000.0, "rope_type": "default"}, max_position=64).to(device)
    q_norm, k_norm = layers.RMSNorm(32, 1e-6).to(device), layers.RMSNorm(32, 1e-6).to(device)
    with torch.no_grad():
        q_norm.weight.uniform_(0.5, 1.5)
        k_norm.weight.uniform_(0.5, 1.5)
    q, k = torch.randn(6, 4, 32, device=device) * 2, torch.randn(6, 2, 32, device=device) * 2
    positions = torch.tensor([0, 5, 6, 33, 63, 2], device=device)
    monkeypatch.setattr(layers, "use_kernels", lambda t: False)
    want_q, want_k, _ = rope(positions, q.clone(), k.clone(), qk_norm=(q_norm, k_norm))
    monkeypatch.setattr(layers, "use_kernels", lambda t: True)  # CPU: the kernel runs in the interpreter
    got_q, got_k, _ = rope(positions, q.clone(), k.clone(), qk_norm=(q_norm, k_norm))
    torch.testing.assert_close(got_q, want_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_k, want_k, atol=1e-5, rtol=1e-5)

"""Building blocks shared by the model files: RMSNorm, rotary embedding, gated activation.

Shapes follow the flattened batch of one step: hidden states are `[num_tokens, hidden_size]`,
per-head tensors `[num_tokens, num_heads, head_dim]`. RMSNorm and the rotary embedding compute
in float32 and return the input dtype, as Hugging Face does. Rotary frequencies come from the
checkpoint config (`rope_parameters` in transformers 5, `rope_theta` + `rope_scaling` before),
with the `default`, `linear` and `llama3` rope types. On CPU cos/sin are computed per step
from the positions; on CUDA one fp32 cos/sin table of `max_position` rows is built once and
shared by every layer (same values: the table holds the same fp32 products).

On CUDA (and unless `set_fused_kernels(False)`), the modules run the Triton kernels of
`shardserve.workers.kernels`: RMSNorm with the residual add fused in (`forward(x, residual)`
returns `(normed, new_residual)`), in-place rotary on q/k, and SiLU-and-mul. Each kernel
computes what the torch path computes (fp32 inside, one rounding to the input dtype), so the
torch path stays the reference. On CPU with float32 tensors, the same three modules run the
fused C++ ops of `workers/quant/cpu_kernels/decode_ops.cpp` instead (one call each in place of
~5-10 eager ops), the rotary one also storing k and v into the paged cache; where that extension
is unavailable (or `set_fused_kernels(False)`) the torch path runs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from shardserve.parallel.comm import (
    tensor_model_parallel_all_reduce,
    tensor_model_parallel_all_reduce_rmsnorm,
)
from shardserve.parallel.quant import UnquantizedLinearMethod
from shardserve.workers.quant.cpu_kernels import decode_ops
from torch import nn

_fused_kernels_enabled = True
# (head_dim, rope params, max_position, device) -> (cos, sin) [max_position, head_dim / 2] fp32
_ROPE_TABLES: dict[tuple[int, str, int, str], tuple[torch.Tensor, torch.Tensor]] = {}


def set_fused_kernels(enabled: bool) -> None:
    """Process-wide switch: False makes CUDA tensors, and CPU float32 ones, take the torch path (for A/B checks)."""
    global _fused_kernels_enabled
    _fused_kernels_enabled = enabled
    decode_ops.set_enabled(enabled)
    from shardserve.parallel.kernels import decode_linear

    decode_linear.set_enabled(enabled)


def use_kernels(x: torch.Tensor) -> bool:
    """True when x lives on a CUDA device and the Triton kernels are enabled."""
    return x.is_cuda and _fused_kernels_enabled


PREFETCH_MAX_ROWS = 16  # decode-size steps only: larger GEMMs are compute-bound, not waiting on HBM


def prefetch_bytes_for(tp_size: int) -> int:
    """Bytes a decoder layer hints into L2 behind each fused all-reduce: `parallel.l2_prefetch_mb`
    (experimental, off by default) under tensor parallelism, 0 otherwise (no all-reduce to hide behind)."""
    if tp_size <= 1:
        return 0
    from shardserve.workers.kernels.l2_prefetch import prefetch_cap

    return prefetch_cap()


def prefetch_weights(x: torch.Tensor, max_bytes: int, *linears: nn.Module) -> None:
    """Right after a fused TP all-reduce at decode size, hint the first `max_bytes` of the next
    linears' weights (each one's largest parameter) into L2 while that kernel still runs
    (workers/kernels/l2_prefetch.py); a no-op off CUDA."""
    if max_bytes <= 0 or not use_kernels(x) or x.shape[0] > PREFETCH_MAX_ROWS:
        return
    from shardserve.workers.kernels.l2_prefetch import l2_prefetch

    l2_prefetch([max(m.parameters(recurse=False), key=lambda p: p.numel()) for m in linears], max_bytes)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, params_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=params_dtype or torch.get_default_dtype()),
                                   requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, reduce: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """rmsnorm(x) * weight; with `residual`, returns (rmsnorm(x + residual) * weight, x + residual).

        x, residual: [..., hidden_size], normalised over the last dim. reduce: x is this TP rank's
        partial sum (a row-parallel layer's output left unreduced); it is summed over the TP group
        first, fused with the add and the norm into one kernel where the group supports it.
        """
        if reduce:
            fused = tensor_model_parallel_all_reduce_rmsnorm(x, residual, self.weight, self.eps) \
                if use_kernels(x) else None
            if fused is not None:  # (only taken with a residual)
                return fused
            x = tensor_model_parallel_all_reduce(x)
        if use_kernels(x) and x.dim() == 2 and x.stride(-1) == 1:
            from shardserve.parallel.kernels.rmsnorm import rmsnorm

            out, new_residual = rmsnorm(x, self.weight, self.eps, residual)  # [T, hidden] each
            return out if residual is None else (out, new_residual)
        if decode_ops.wanted(x) and x.dim() == 2 and self.weight.dtype == torch.float32 \
                and (residual is None or residual.dtype == torch.float32):
            out, stream = decode_ops.ops().rms_norm(x, residual, self.weight, self.eps)  # [T, hidden] each
            return out if residual is None else (out, stream)
        if residual is not None:
            x = x + residual  # rounded to the model dtype, as the residual stream holds it
            return self._norm(x), x
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def gate_up_silu(gate_up_proj: nn.Module, act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """act(gate_up_proj(x)) [T, inter / tp]; at decode size on CUDA, one kernel with the SiLU-and-mul
    in the projection's epilogue (parallel/kernels/decode_linear.py for plain weights, the quantized
    runtime's `silu_mul` (workers/quant/cuda.py) for INT4 / INT8 / FP8)."""
    fused = getattr(getattr(gate_up_proj.quant_method, "runtime", None), "silu_mul", None)
    if fused is not None and use_kernels(x) and isinstance(act, SiluAndMul) and gate_up_proj.bias is None:
        out = fused(x)
        if out is not None:
            return out
    weight = getattr(gate_up_proj, "weight", None)
    if (use_kernels(x) and isinstance(act, SiluAndMul) and weight is not None and gate_up_proj.bias is None
            and isinstance(gate_up_proj.quant_method, UnquantizedLinearMethod)):
        from shardserve.parallel.kernels.decode_linear import decode_linear, wanted_for

        if wanted_for(x, weight):
            return decode_linear(x, weight, silu_mul=True)
    return act(gate_up_proj(x))


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [num_tokens, 2 * d] (gate then up) -> [num_tokens, d]
        if use_kernels(x) and x.dim() == 2 and x.stride(-1) == 1:
            from shardserve.workers.kernels.activation import silu_and_mul

            return silu_and_mul(x)
        if decode_ops.wanted(x) and x.dim() == 2:
            return decode_ops.ops().silu_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


def rope_parameters(config: Any) -> dict[str, Any]:
    """Rope settings of a transformers config, old or new style: has rope_theta and rope_type."""
    params = getattr(config, "rope_parameters", None)
    if params and "rope_theta" not in params and "full_attention" in params:  # per-layer-type form
        params = params["full_attention"]
    if params:
        params = dict(params)
    else:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default")) or "default"
    return params


def rope_inv_freq(head_dim: int, params: dict[str, Any]) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in float32 for the given rope parameters."""
    base = float(params["rope_theta"])
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = params["rope_type"]
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(params["factor"])
    if rope_type == "llama3":
        factor = float(params["factor"])
        low_freq_factor = float(params["low_freq_factor"])
        high_freq_factor = float(params["high_freq_factor"])
        old_context_len = float(params["original_max_position_embeddings"])
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise NotImplementedError(f"rope_type {rope_type!r} is not supported; supported: default, linear, llama3")


class RotaryEmbedding(nn.Module):
    """Non-interleaved (rotate-half) rotary embedding over the whole head.

    max_position: rows of the shared cos/sin table the CUDA kernel path reads (positions must
    stay below it; the engine caps contexts at max_model_len <= max_position_embeddings).
    """

    def __init__(self, head_dim: int, params: dict[str, Any], max_position: int = 8192) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_position = max_position
        self._table_key = repr(sorted(params.items()))
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, params), persistent=False)

    def cos_sin_table(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Shared (cos, sin) [max_position, head_dim / 2] fp32 on `device`, built on first use."""
        key = (self.head_dim, self._table_key, self.max_position, str(device))
        table = _ROPE_TABLES.get(key)
        if table is None:
            positions = torch.arange(self.max_position, device=device, dtype=torch.float32)
            freqs = positions[:, None] * self.inv_freq.to(device)[None, :]  # [max_position, head_dim / 2]
            table = (freqs.cos().contiguous(), freqs.sin().contiguous())
            _ROPE_TABLES[key] = table
        return table

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                kv_write: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                qk_norm: tuple[RMSNorm, RMSNorm] | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Rotated (q, k) and whether `kv_write = (v, kv_cache, slot_mapping)` was done too: the
        CUDA kernel stores the rotated k and v into the paged cache in the same launch; the
        torch path leaves that to the attention backend (False). `qk_norm` (Qwen3's per-head
        q and k norms) are applied before the rotation, inside the same kernel on CUDA."""
        # positions: [num_tokens]; q: [num_tokens, num_heads, head_dim]; k: [num_tokens, num_kv_heads, head_dim]
        if use_kernels(q):
            from shardserve.workers.kernels.rotary import rotary_embedding

            cos, sin = self.cos_sin_table(q.device)
            norms = None
            if qk_norm is not None:
                q_norm, k_norm = qk_norm
                if q_norm.eps != k_norm.eps:  # one eps per launch; never the case in Qwen3 configs
                    q, k = q_norm(q), k_norm(k)
                else:
                    norms = (q_norm.weight, k_norm.weight, q_norm.eps)
            q, k = rotary_embedding(q, k, positions, cos, sin, kv_write=kv_write, qk_norm=norms)  # in place
            return q, k, kv_write is not None
        if qk_norm is not None:
            q, k = qk_norm[0](q), qk_norm[1](k)
        if kv_write is not None and _cpu_rotary_kv(positions, q, k, kv_write, self.inv_freq):
            return q, k, True
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [num_tokens, head_dim / 2]
        cos = freqs.cos().repeat(1, 2)[:, None, :]  # [num_tokens, 1, head_dim]
        sin = freqs.sin().repeat(1, 2)[:, None, :]
        return _rotate(q, cos, sin), _rotate(k, cos, sin), False


def _cpu_rotary_kv(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                   kv_write: tuple[torch.Tensor, torch.Tensor, torch.Tensor], inv_freq: torch.Tensor) -> bool:
    """On CPU in float32: rotate q and k in place and store k, v into the cache in one fused call
    (decode_ops.cpp); False (nothing done) where the fused op does not apply."""
    v, kv_cache, slot_mapping = kv_write
    if not (decode_ops.wanted(q) and k.dtype == v.dtype == kv_cache.dtype == inv_freq.dtype == torch.float32
            and kv_cache.is_contiguous() and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1):
        return False
    decode_ops.ops().rotary_kv(q, k, v, positions.to(torch.int64), inv_freq, kv_cache, slot_mapping.to(torch.int64))
    return True


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)

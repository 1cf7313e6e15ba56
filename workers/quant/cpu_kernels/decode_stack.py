"""A Llama decoder stack's decode-size steps on CPU in one C++ call (decode_stack.cpp).

A batch-1 CPU decode step of the embedded SmolLM2 runs 30 layers of ~10 small module calls, each
with its own tensor casts, views and dispatch: several ms of single-threaded Python a token, as
much as the matmuls take on 2 cores. `build_stack(model)` hands every layer's packed weights
(the Q4Runtime / Q8Runtime of workers/quant/cpu_kernels/runtime.py), norms and rope frequencies
to a C++ `DecodeStack` once; `CpuDecodeStack.__call__` then runs all layers in one call with the
same kernels in the same order, so hidden states are bit-identical to the per-module path (the
reference the tests compare against). It applies only where that path would take the fused CPU
ops anyway: float32 CPU model, one TP rank, the CPU attention backend, no q/k norm, dense MLPs,
every projection on the packed kernels (no act-order); `build_stack` returns None otherwise, and
`wanted(...)` keeps steps of `DENSE_FROM_ROWS` tokens or more (the
matmuls take F.linear there), longer prefills, other dtypes, `set_fused_kernels(False)` and `set_enabled(False)`
on the modules.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

import torch
from shardserve.workers.quant.cpu_kernels import DENSE_FROM_ROWS, decode_ops
from shardserve.workers.quant.cpu_kernels.build import HERE, build_or_none
from shardserve.workers.quant.cpu_kernels.runtime import Q4Runtime, Q8Runtime

EXTENSION_NAME = "shardserve_cpu_decode_stack_v1"
MAX_QUERY_LEN = 32  # as the CPU attention backend's fused path (cpu_backend.FUSED_MAX_QUERY_LEN)
_enabled = True


def set_enabled(enabled: bool) -> None:
    """Process-wide switch (A/B checks, benchmarks): False runs decode steps module by module."""
    global _enabled
    _enabled = enabled


@functools.cache
def _built() -> ModuleType | None:
    return build_or_none(HERE / "decode_stack.cpp", EXTENSION_NAME, "the CPU decode path keeps one call per module")


class CpuDecodeStack:
    def __init__(self, stack: Any, runtimes: list[Q4Runtime | Q8Runtime]) -> None:
        self.stack, self.runtimes = stack, runtimes
        self.num_layers = stack.num_layers()

    def wanted(self, h: torch.Tensor, kv_caches: list[torch.Tensor], max_query_len: int) -> bool:
        return (_enabled and h.device.type == "cpu" and h.dtype == torch.float32 and h.dim() == 2 and h.is_contiguous()
                and h.shape[0] < DENSE_FROM_ROWS and max_query_len <= MAX_QUERY_LEN and decode_ops.ops() is not None
                and all(c.dtype == torch.float32 and c.is_contiguous() for c in kv_caches))

    def __call__(self, h: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                 metadata: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(last layer's MLP output, residual stream before it), each [T, hidden]; a KV cache count
        other than the layer count is a ValueError."""
        if len(kv_caches) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} KV cache tensors, got {len(kv_caches)}")
        out, residual = self.stack.forward(
            h, positions.to(torch.int64), kv_caches, metadata.slot_mapping.to(torch.int64),
            metadata.block_tables.to(torch.int32).contiguous(), metadata.seq_lens.to(torch.int32),
            metadata.query_start_loc.to(torch.int32), self.runtimes[0].int8_activations)
        return out, residual


def build_stack(model: torch.nn.Module) -> CpuDecodeStack | None:
    """The C++ stack over `model`'s own decoder layers (a LlamaModel whose layers are plain Llama
    attention + SiLU MLP on the CPU attention backend, as llama.py checks), or None where it does not apply."""
    layers = model.own_layers
    if not layers or decode_ops.ops() is None:
        return None
    runtimes: list[Q4Runtime | Q8Runtime] = []
    linears: list[list[tuple]] = []
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        if attn.q_norm is not None:
            return None
        row = []
        for proj in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
            packed = _packed(proj)
            if packed is None:
                return None
            runtimes.append(proj.quant_method.runtime)
            row.append(packed)
        linears.append(row)
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if norm.weight.dtype != torch.float32 or norm.weight.device.type != "cpu":
                return None
    if len({r.int8_activations for r in runtimes}) != 1:
        return None
    ext = _built()
    if ext is None:
        return None
    first = layers[0]
    attn = first.self_attn
    stack = ext.DecodeStack(attn.num_heads, attn.num_kv_heads, attn.head_dim, first.input_layernorm.eps,
                            attn.scale)
    for layer, (qkv, o, gate_up, down) in zip(layers, linears, strict=True):
        if layer.input_layernorm.eps != first.input_layernorm.eps or \
                layer.post_attention_layernorm.eps != first.input_layernorm.eps:
            return None
        inv_freq = layer.self_attn.rotary_emb.inv_freq
        if inv_freq.dtype != torch.float32:
            return None
        stack.add_layer(layer.input_layernorm.weight.data, layer.post_attention_layernorm.weight.data,
                        inv_freq, qkv, o, gate_up, down)
    return CpuDecodeStack(stack, runtimes)


def _packed(proj: torch.nn.Module) -> tuple | None:
    """(is_q4, qs, scales, mins, group_size, bias) of a one-rank projection on the packed kernels."""
    runtime = getattr(getattr(proj, "quant_method", None), "runtime", None)
    if getattr(proj, "tp_size", 1) != 1 or not isinstance(runtime, Q4Runtime | Q8Runtime) or runtime.perm is not None \
            or runtime.pad:
        return None
    bias = None if proj.bias is None else proj.bias.data.float().contiguous()
    p = runtime.packed
    if isinstance(runtime, Q4Runtime):
        return (True, p.qs, p.dm, None, p.group_size, bias)
    return (False, p.qs, p.d, p.mins, p.group_size, bias)

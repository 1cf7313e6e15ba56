"""Llama-family decoder: Llama 2/3/3.1, Mistral, Qwen2, Qwen3, SmolLM2 (and the MoE models' skeleton).

Data flow of one step: token ids [T] -> vocab-parallel embedding -> N decoder layers -> final
RMSNorm -> hidden states [T, hidden]. Each layer is pre-norm attention then pre-norm MLP, each
added to the residual stream; a layer returns its MLP output and the stream separately, so the
add happens inside the next RMSNorm (one fused kernel on CUDA). Attention projects with one
column-parallel qkv matmul (this rank's heads), optionally normalises q/k per head (Qwen3),
applies rope and hands q/k/v plus this layer's paged KV cache to the attention backend; the
row-parallel o_proj returns this rank's partial sum, and the TP all-reduce happens in the norm
after it (`RMSNorm(..., reduce=True)`, fused with the add and the norm on GPUs:
parallel/fused_allreduce_norm.py). The MLP's output is left unreduced the same way and summed by
the next norm. `compute_logits` runs the LM head on the rows the runner samples. Variants differ
only in `LlamaOptions` (biases, q/k norm) and the MLP built per layer (dense, or MoE in moe.py).

Under pipeline parallelism (parallel/pipeline.py) a stage builds only its range of layers (the
others are `PPMissingLayer`), the embedding lives on the first stage and the final norm and LM
head on the last; a stage other than the last returns its residual stream and one other than the
first starts from `hidden_in`; the model runner moves them between stages, outside the CUDA
graphs. Checkpoint tensors of other stages are skipped without being read.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from shardserve.parallel.comm import tensor_model_parallel_all_reduce
from shardserve.parallel.embedding import ParallelLMHead, VocabParallelEmbedding
from shardserve.parallel.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from shardserve.parallel.pipeline import PPMissingLayer, layer_range
from shardserve.parallel.quant import ShardSlice, copy_shard
from shardserve.parallel.state import get_parallel_state
from shardserve.workers.attention.backend import AttentionBackend, get_attention_backend
from shardserve.workers.attention.cpu_backend import CpuAttentionBackend
from shardserve.workers.attention.metadata import AttentionMetadata
from shardserve.workers.models.interface import KVCacheSpec
from shardserve.workers.models.layers import (
    RMSNorm,
    RotaryEmbedding,
    SiluAndMul,
    gate_up_silu,
    prefetch_bytes_for,
    prefetch_weights,
    rope_parameters,
)
from shardserve.workers.quant.cpu_kernels.decode_stack import CpuDecodeStack, build_stack
from torch import nn


@dataclass(frozen=True)
class LlamaOptions:
    """Per-family switches. qkv_bias / o_bias: biases of the projections; qk_norm: Qwen3's per-head norm."""

    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False


def head_dim_of(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class LlamaMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, params_dtype=dtype)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, params_dtype=dtype)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, hidden] -> [T, 2 * inter / tp] -> [T, inter / tp] -> [T, hidden] (all-reduced
        # unless down_proj.reduce_results is off, as for a shared expert)
        return self.down_proj(gate_up_silu(self.gate_up_proj, self.act, x))

    def forward_unreduced(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """(this TP rank's partial sum [T, hidden], True): the caller reduces it (LlamaDecoderLayer
        leaves it to the next RMSNorm)."""
        return self.down_proj(gate_up_silu(self.gate_up_proj, self.act, x), reduce=False), True


class LlamaAttention(nn.Module):
    def __init__(self, config: Any, options: LlamaOptions, backend: AttentionBackend,
                 dtype: torch.dtype | None) -> None:
        super().__init__()
        self.head_dim = head_dim_of(config)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, bias=options.qkv_bias, params_dtype=dtype)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size,
                                        bias=options.o_bias, params_dtype=dtype)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype) if options.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype) if options.qk_norm else None
        self.rotary_emb = RotaryEmbedding(self.head_dim, rope_parameters(config),
                                          int(getattr(config, "max_position_embeddings", 0) or 8192))
        self.scale = self.head_dim**-0.5
        self.backend = backend
        self.o_proj.reduce_results = False  # a TP partial sum: post_attention_layernorm reduces it

    def forward(self, positions: torch.Tensor, x: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, (heads + 2 * kv_heads) * head_dim], this rank's heads
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)  # [T, heads, head_dim]
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)  # [T, kv_heads, head_dim]
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        qk_norm = None if self.q_norm is None else (self.q_norm, self.k_norm)  # fused into the rotary kernel on CUDA
        q, k, kv_written = self.rotary_emb(positions, q, k, kv_write=(v, kv_cache, attn_metadata.slot_mapping),
                                           qk_norm=qk_norm)
        out = self.backend.forward(q, k, v, kv_cache, attn_metadata, self.scale,
                                   kv_written=kv_written)  # [T, heads, head_dim]
        return self.o_proj(out.reshape(num_tokens, self.q_size))  # [T, hidden], this rank's partial sum


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: Any, options: LlamaOptions, backend: AttentionBackend, mlp: nn.Module,
                 dtype: torch.dtype | None) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, options, backend, dtype)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        # the norms above all-reduce first under TP: the next weights may be hinted into L2 behind them
        self.prefetch_bytes = prefetch_bytes_for(get_parallel_state().tp_size)

    def forward(self, positions: torch.Tensor, h: torch.Tensor, residual: torch.Tensor | None,
                kv_cache: torch.Tensor, attn_metadata: AttentionMetadata, h_is_partial: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """h: [T, hidden], the previous layer's MLP output not yet added to `residual` (the
        residual stream; None at the first layer, where h is the stream itself), a TP partial
        sum when `h_is_partial`. Each add is fused into the norm that follows it (and so is each
        TP all-reduce, where the group has the fused kernel), so a layer has no separate add
        kernel; returns this layer's (MLP output, residual stream before it, whether the MLP
        output is still a TP partial sum: the consumer, i.e. the next layer's input norm, the
        final norm or the PP send, reduces it)."""
        if residual is None:
            x, residual = self.input_layernorm(h), h
        else:
            x, residual = self.input_layernorm(h, residual, reduce=h_is_partial)  # one fused add + norm on CUDA
            if h_is_partial and self.prefetch_bytes:  # behind the fused all-reduce (experimental, off by default)
                prefetch_weights(x, self.prefetch_bytes, self.self_attn.qkv_proj, self.self_attn.o_proj)
        attn_out = self.self_attn(positions, x, kv_cache, attn_metadata)  # TP partial sum
        mlp_in, residual = self.post_attention_layernorm(attn_out, residual, reduce=True)
        if self.prefetch_bytes and hasattr(self.mlp, "gate_up_proj"):
            prefetch_weights(mlp_in, self.prefetch_bytes, self.mlp.gate_up_proj)
        out, out_is_partial = self.mlp.forward_unreduced(mlp_in)
        return out, residual, out_is_partial


UNBUILT = object()  # LlamaModel.cpu_stack before its first CPU step
MLPFactory = Callable[[int], nn.Module]  # layer index -> MLP module (with `forward_unreduced`, as LlamaMLP)
_LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")


class LlamaModel(nn.Module):
    def __init__(self, config: Any, options: LlamaOptions, backend: AttentionBackend, make_mlp: MLPFactory,
                 dtype: torch.dtype | None) -> None:
        super().__init__()
        state = get_parallel_state()
        self.is_first_stage, self.is_last_stage = state.is_first_pp_rank, state.is_last_pp_rank
        self.hidden_size = config.hidden_size
        self.dtype = dtype or torch.get_default_dtype()
        self.start_layer, self.end_layer = layer_range(config.num_hidden_layers)
        self.embed_tokens = (VocabParallelEmbedding(config.vocab_size, config.hidden_size, dtype)
                             if self.is_first_stage else None)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, options, backend, make_mlp(i), dtype)
            if self.start_layer <= i < self.end_layer else PPMissingLayer()
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype) if self.is_last_stage else None
        self.cpu_stack: CpuDecodeStack | None | object = UNBUILT  # built at the first CPU step

    @property
    def own_layers(self) -> list[LlamaDecoderLayer]:
        """The decoder layers of this pipeline stage, in order."""
        return list(self.layers[self.start_layer:self.end_layer])

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata, hidden_in: torch.Tensor | None = None) -> torch.Tensor:
        """The last stage's normed hidden states [T, hidden]; on an earlier pipeline stage, its
        residual stream [T, hidden] for the next stage. Stages after the first start from
        `hidden_in`, the previous stage's residual stream. The model runner moves the tensors
        between stages (outside any CUDA graph: stages are captured like single-GPU models)."""
        if self.embed_tokens is not None:
            h = self.embed_tokens(input_ids)  # [T, hidden]
        elif hidden_in is None:
            raise ValueError("a pipeline stage after the first needs hidden_in, the previous stage's output")
        else:
            h = hidden_in  # [T, hidden]
        residual, partial = None, False
        stack = self._cpu_decode_stack(h)
        if stack is not None and stack.wanted(h, kv_caches, attn_metadata.max_query_len):
            h, residual = stack(h, positions, kv_caches, attn_metadata)  # every layer in one C++ call
        else:
            layers = self.own_layers
            if len(kv_caches) != len(layers):
                raise ValueError(f"expected {len(layers)} KV cache tensors, got {len(kv_caches)}")
            for layer, kv_cache in zip(layers, kv_caches, strict=True):
                h, residual, partial = layer(positions, h, residual, kv_cache, attn_metadata, h_is_partial=partial)
        if self.norm is None:
            if partial:
                h = tensor_model_parallel_all_reduce(h)
            return h + residual  # the next stage starts from the whole residual stream
        return self.norm(h, residual, reduce=partial)[0]

    def _cpu_decode_stack(self, h: torch.Tensor) -> CpuDecodeStack | None:
        """On CPU, the C++ stack of this stage's layers for decode-size steps (built once, after
        loading; None where it does not apply: workers/quant/cpu_kernels/decode_stack.py)."""
        if h.device.type != "cpu":
            return None
        if self.cpu_stack is UNBUILT:
            plain = all(type(layer) is LlamaDecoderLayer and type(layer.self_attn) is LlamaAttention
                        and type(layer.mlp) is LlamaMLP and isinstance(layer.mlp.act, SiluAndMul)
                        and isinstance(layer.self_attn.backend, CpuAttentionBackend)
                        for layer in self.own_layers)  # subclasses may compute differently
            self.cpu_stack = build_stack(self) if plain else None
        return self.cpu_stack


# (our parameter name fragment, checkpoint name fragment, shard id) for merged layers.
STACKED_PARAMS: tuple[tuple[str, str, object], ...] = (
    (".qkv_proj.", ".q_proj.", "q"),
    (".qkv_proj.", ".k_proj.", "k"),
    (".qkv_proj.", ".v_proj.", "v"),
    (".gate_up_proj.", ".gate_proj.", 0),
    (".gate_up_proj.", ".up_proj.", 1),
)


def stacked_target(name: str) -> tuple[str, object]:
    """Our parameter name and shard id for a checkpoint name (merged q/k/v and gate/up)."""
    for ours, theirs, shard_id in STACKED_PARAMS:
        if theirs in name:
            return name.replace(theirs, ours), shard_id
    return name, None


class LlamaForCausalLM(nn.Module):
    """Llama 2/3/3.1 and SmolLM2; the base of the other families (see `options_for`, `make_mlp`)."""

    def __init__(self, config: Any, params_dtype: torch.dtype | None = None,
                 attn_backend: AttentionBackend | None = None) -> None:
        super().__init__()
        self.config = config
        backend = attn_backend or get_attention_backend("torch")
        self.model = LlamaModel(config, self.options_for(config), backend, self.mlp_factory(config, params_dtype),
                                params_dtype)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head: ParallelLMHead | None = None
        self.cpu_lm_head: Callable[[torch.Tensor], torch.Tensor] | None = None  # set by use_cpu_lm_head
        if self.model.is_last_stage:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, params_dtype)
            if self.tie_word_embeddings and self.model.embed_tokens is not None:
                self.lm_head.tie_to(self.model.embed_tokens)
        own_layers = self.model.own_layers
        attn = own_layers[0].self_attn
        self.kv_cache_spec = KVCacheSpec(len(own_layers), attn.num_kv_heads, attn.head_dim)
        self.loaded_param_names: set[str] = set()

    @classmethod
    def options_for(cls, config: Any) -> LlamaOptions:
        bias = bool(getattr(config, "attention_bias", False))
        return LlamaOptions(qkv_bias=bias, o_bias=bias)

    @classmethod
    def mlp_factory(cls, config: Any, dtype: torch.dtype | None) -> MLPFactory:
        return lambda _: LlamaMLP(config.hidden_size, config.intermediate_size, dtype)

    def set_attention_backend(self, backend: AttentionBackend) -> None:
        """Swap the attention implementation of every layer (e.g. to `triton` on GPU)."""
        for layer in self.model.own_layers:
            layer.self_attn.backend = backend
        self.model.cpu_stack = UNBUILT  # rebuilt at the next CPU step: it needs the CPU backend

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata, hidden_in: torch.Tensor | None = None) -> torch.Tensor:
        """[T, hidden]: normed hidden states on the last pipeline stage, the residual stream for
        the next stage on the others (see LlamaModel.forward)."""
        return self.model(input_ids, positions, kv_caches, attn_metadata, hidden_in)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            raise RuntimeError("only the last pipeline stage computes logits")
        if self.cpu_lm_head is not None and hidden_states.device.type == "cpu":
            return self.cpu_lm_head(hidden_states)  # [N, vocab_size] float32, from packed 8-bit blocks
        return self.lm_head(hidden_states)  # [N, vocab_size], the model's dtype

    def use_cpu_lm_head(self) -> bool:
        """On CPU, compute logits from the LM head's exact 8-bit blocks where the float weight is
        one (cpu_head.py: the embedded GGUF's tied Q8_0 table); True if that applies. Packed once:
        a self-draft sharing this head (workers/spec/self_draft.py) keeps the target's blocks."""
        from shardserve.workers.models.cpu_head import packed_lm_head

        if self.cpu_lm_head is None:
            self.cpu_lm_head = packed_lm_head(self.lm_head)
        return self.cpu_lm_head is not None

    def holds_checkpoint_tensor(self, name: str) -> bool:
        """False for tensors that belong to another pipeline stage (they are never read)."""
        match = _LAYER_INDEX.match(name)
        if match is not None:
            return self.model.start_layer <= int(match.group(1)) < self.model.end_layer
        if name.startswith("model.embed_tokens."):
            return self.model.embed_tokens is not None or (self.tie_word_embeddings and self.lm_head is not None)
        if name.startswith(("model.norm.", "lm_head.")):
            return self.lm_head is not None
        return True

    def map_checkpoint_name(self, name: str) -> str:
        """Hook for families whose checkpoint names differ (e.g. Mixtral's block_sparse_moe)."""
        return name

    def load_expert_weight(self, params: dict[str, nn.Parameter], name: str, weight: torch.Tensor) -> bool:
        """Hook for MoE families: load `name` if it is an expert weight and return True."""
        return False

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for hf_name, weight in weights:
            if "rotary_emb.inv_freq" in hf_name:
                continue
            if hf_name == "lm_head.weight" and self.tie_word_embeddings:
                continue  # the LM head is the embedding
            name = self.map_checkpoint_name(hf_name)
            if not self.holds_checkpoint_tensor(name):
                continue  # another pipeline stage's tensor
            if name == "model.embed_tokens.weight" and self.model.embed_tokens is None:
                name = "lm_head.weight"  # tied LM head on a last stage that does not embed
            if self.load_expert_weight(params, name, weight):
                loaded.add(hf_name)
                continue
            target, shard_id = stacked_target(name)
            if target not in params:
                raise ValueError(f"checkpoint tensor {hf_name!r} has no parameter in {type(self).__name__}")
            param = params[target]
            loader = getattr(param, "weight_loader", None)
            if loader is None:
                copy_shard(param, weight, ShardSlice())
            else:
                loader(param, weight, shard_id)
            self.loaded_param_names.add(target)
            loaded.add(hf_name)
        return loaded

    def missing_parameters(self) -> list[str]:
        """Parameters no checkpoint tensor has been loaded into yet."""
        return sorted(set(dict(self.named_parameters())) - self.loaded_param_names)


class MistralForCausalLM(LlamaForCausalLM):
    pass


class Qwen2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def options_for(cls, config: Any) -> LlamaOptions:
        return LlamaOptions(qkv_bias=True, o_bias=False)


class Qwen3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def options_for(cls, config: Any) -> LlamaOptions:
        bias = bool(getattr(config, "attention_bias", False))
        return LlamaOptions(qkv_bias=bias, o_bias=bias, qk_norm=True)

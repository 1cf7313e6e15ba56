"""Tiny random Hugging Face checkpoints for the parity tests, one per supported family.

Each config is small (hidden 64, 2 layers, vocab 256) and built with its transformers config
class. `save_checkpoint` instantiates the HF model with a fixed seed, perturbs every parameter
(so norm weights are not 1 and biases not 0, and a wrongly loaded tensor shows), and writes it
with `save_pretrained` (safetensors; optionally sharded to exercise the index file).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)

COMMON = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, initializer_range=0.1, bos_token_id=None, eos_token_id=None,
              pad_token_id=None)


# Qwen2-MoE: routed experts plus a sigmoid-gated shared expert.
QWEN2_MOE = dict(intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=6,
                 num_experts_per_tok=2, tie_word_embeddings=False, architectures=["Qwen2MoeForCausalLM"])


def tiny_configs() -> dict[str, PretrainedConfig]:
    return {
        "llama_tied": LlamaConfig(**COMMON, intermediate_size=128, tie_word_embeddings=True,
                                  architectures=["LlamaForCausalLM"]),
        "llama3_rope": LlamaConfig(**COMMON, intermediate_size=128, tie_word_embeddings=False,
                                   rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 64},
                                   architectures=["LlamaForCausalLM"]),
        "mistral_sharded": MistralConfig(**COMMON, intermediate_size=128, sliding_window=None,
                                         tie_word_embeddings=False, architectures=["MistralForCausalLM"]),
        "qwen2_bias": Qwen2Config(**COMMON, intermediate_size=128, tie_word_embeddings=False,
                                  architectures=["Qwen2ForCausalLM"]),
        "qwen3": Qwen3Config(**COMMON, intermediate_size=128, head_dim=32, tie_word_embeddings=False,
                             architectures=["Qwen3ForCausalLM"]),
        "mixtral": MixtralConfig(**COMMON, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
                                 sliding_window=None, tie_word_embeddings=False, architectures=["MixtralForCausalLM"]),
        "qwen2_moe": Qwen2MoeConfig(**COMMON, **QWEN2_MOE, norm_topk_prob=True, decoder_sparse_step=1,
                                    mlp_only_layers=[]),
        "qwen2_moe_step2_dense_mixed": Qwen2MoeConfig(**{**COMMON, "num_hidden_layers": 4}, **QWEN2_MOE,
                                                      norm_topk_prob=False, decoder_sparse_step=2, mlp_only_layers=[3]),
        "qwen3_moe": Qwen3MoeConfig(**COMMON, intermediate_size=96, moe_intermediate_size=32, num_experts=6,
                                    num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1,
                                    mlp_only_layers=[1], tie_word_embeddings=False,
                                    architectures=["Qwen3MoeForCausalLM"]),
    }


def save_checkpoint(config: PretrainedConfig, folder: Path, seed: int, max_shard_size: str | None = None
                    ) -> torch.nn.Module:
    """Build, perturb and save the HF model; returns it (float32, eval, eager attention)."""
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return model

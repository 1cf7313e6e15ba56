"""Maps a checkpoint's `config.architectures[0]` (or, for GGUF metadata, its model_type) to our class."""

from __future__ import annotations

from typing import Any

from shardserve.workers.models.llama import (
    LlamaForCausalLM,
    MistralForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)
from shardserve.workers.models.moe import MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM
from torch import nn

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
}

_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}


def architecture_of(config: Any) -> str:
    """The architecture name of a transformers config (falls back on model_type)."""
    architectures = getattr(config, "architectures", None) or []
    if architectures:
        return architectures[0]
    model_type = getattr(config, "model_type", None)
    if model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    raise ValueError(f"config names no architecture and model_type {model_type!r} is not one of "
                     f"{sorted(_BY_MODEL_TYPE)}")


def model_class_for(config: Any) -> type[nn.Module]:
    arch = architecture_of(config)
    if arch not in MODEL_REGISTRY:
        raise ValueError(f"architecture {arch!r} is not supported; supported: {sorted(MODEL_REGISTRY)}")
    return MODEL_REGISTRY[arch]

"""Reads a GGUF file into a transformers config and Hugging Face-named, dequantized tensors.

transformers' GGUF utilities do the work: `load_gguf_checkpoint(return_tensors=False)` parses
the metadata into a config dict, from which the config class is built; a Hugging Face model
instantiated on the meta device (no memory) then tells `load_gguf_checkpoint(return_tensors=True)`
how GGUF tensor names map to Hugging Face names (it also un-permutes Llama's q/k rows). The
tensors are dequantized on the CPU and cast to the compute dtype; the model's `load_weights`
consumes them like a safetensors checkpoint.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint


def read_gguf_config(path: Path) -> PretrainedConfig:
    config_dict = dict(load_gguf_checkpoint(str(path), return_tensors=False)["config"])
    model_type = config_dict.pop("model_type")
    config_dict.pop("_model_name_or_path", None)
    return AutoConfig.for_model(model_type, **config_dict)


def read_gguf_tensors(path: Path, config: PretrainedConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Dequantized tensors under Hugging Face parameter names, in `dtype`."""
    with torch.device("meta"):
        hf_model = AutoModelForCausalLM.from_config(config)
    kwargs = {"torch_dtype": dtype} if "torch_dtype" in inspect.signature(load_gguf_checkpoint).parameters else {}
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=hf_model, **kwargs)["tensors"]
    return {name: t.to(dtype) for name, t in tensors.items()}

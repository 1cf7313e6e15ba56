"""Test helper: a tiny Llama written as a compressed-tensors folder by compressed-tensors itself.

Data flow: a random tiny Llama (transformers) gets a QuantizationScheme on every decoder Linear
(`apply_quantization_config`, compressed-tensors' own initialisation); each weight's scale and
zero point come from the package's `calculate_qparams` on the weight's min / max per channel or
group (the min-max observer llm-compressor uses by default); `ModelCompressor` compresses the
model, `save_pretrained` writes it and `update_config` adds the quantization_config — the same
calls llm-compressor's save path makes. The reference weights are compressed-tensors'
decompression of that folder, loaded back by transformers (CompressedTensorsConfig,
run_compressed=False).
"""

from __future__ import annotations

from pathlib import Path

import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
    apply_quantization_config,
    preset_name_to_scheme,
)
from compressed_tensors.quantization.utils.helpers import calculate_qparams
from transformers import AutoModelForCausalLM, CompressedTensorsConfig, LlamaConfig

# name -> (scheme of the decoder Linears, forced compression format or None for the inferred one)
SCHEMES: dict[str, tuple[QuantizationScheme, str | None]] = {
    # weight-only INT8 per channel: compressed-tensors infers pack-quantized (llm-compressor's W8A16)
    "int8_channel_packed": (QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=8, type="int", strategy="channel", symmetric=True)), None),
    "int8_channel_naive": (QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=8, type="int", strategy="channel", symmetric=True)), "int-quantized"),
    "fp8_dynamic": (preset_name_to_scheme("FP8_DYNAMIC", ["Linear"]), None),
    "w4a16_g128": (preset_name_to_scheme("W4A16", ["Linear"]), None),
    "w4a16_asym_g32": (QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", strategy="group", group_size=32, symmetric=False)), None),
}


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    """hidden 128, MLP 256 (K = 128 and 256: whole groups of 128), 2 layers, GQA 4 / 2 heads."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, architectures=["LlamaForCausalLM"], bos_token_id=None,
                         eos_token_id=None, pad_token_id=None)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


def _min_max(weight: torch.Tensor, args: QuantizationArgs) -> tuple[torch.Tensor, torch.Tensor]:
    if args.strategy == "channel":
        return weight.amin(dim=1, keepdim=True), weight.amax(dim=1, keepdim=True)  # [N, 1]
    groups = weight.reshape(weight.shape[0], -1, args.group_size)  # [N, G, g]
    return groups.amin(dim=2), groups.amax(dim=2)  # [N, G]


def write_reference(name: str, folder: Path) -> Path:
    """Writes SCHEMES[name] over a tiny Llama into `folder` with compressed-tensors; returns it."""
    scheme, forced_format = SCHEMES[name]
    model = tiny_llama()
    config = QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"],
                                quantization_status=QuantizationStatus.INITIALIZED)
    apply_quantization_config(model, config, show_progress=False)
    with torch.no_grad():
        for module in model.modules():
            module_scheme = getattr(module, "quantization_scheme", None)
            if module_scheme is None:
                continue
            scale, zero_point = calculate_qparams(*_min_max(module.weight, module_scheme.weights),
                                                  module_scheme.weights)
            module.weight_scale.data = scale.to(module.weight_scale.dtype).reshape(module.weight_scale.shape)
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.data = zero_point.to(module.weight_zero_point.dtype).reshape(
                    module.weight_zero_point.shape)
            module.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=forced_format)
    compressor.compress_model(model)
    model.save_pretrained(folder)
    compressor.update_config(str(folder))
    return folder


def decompressed(folder: Path) -> torch.nn.Module:
    """compressed-tensors' own decompression of `folder`, through transformers: float32, eager."""
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch.float32, attn_implementation="eager",
        quantization_config=CompressedTensorsConfig(run_compressed=False))
    return model.eval()

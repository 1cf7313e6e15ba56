"""Writes a quantized Hugging Face folder that other engines load: GPTQ or AWQ layout.

Data flow: the quantized model (its float tensors — embeddings, norms as AWQ folded them, the
head — from `model.state_dict()`) plus the packed tensors of every quantized linear
(`QuantizedModel.packed`, e.g. model.layers.0.self_attn.q_proj.{qweight,qzeros,scales,g_idx}; MoE
experts one by one, model.layers.0.mlp.experts.7.down_proj.*, in place of the fused float stacks)
go into one model.safetensors; config.json is the model's config with the
`quantization_config` entry of formats/detect.py; the tokenizer files of the source folder are
copied as they are. The folder is written under a temporary name and renamed at the end, so an
interrupted run never leaves a folder that looks complete.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from shardserve.workers.quant.calibrate import QuantizedModel, QuantSpec
from shardserve.workers.quant.formats.detect import quantization_config
from torch import nn

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


def checkpoint_tensors(model: nn.Module, result: QuantizedModel) -> dict[str, torch.Tensor]:
    """Every tensor of the folder: float ones under their own names, packed ones under the linear's."""
    tensors: dict[str, torch.Tensor] = {}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for name, tensor in model.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if (module in result.packed and name.endswith(".weight")) or (tied and name == "lm_head.weight"):
            continue
        if module.endswith(".mlp.experts") and f"{module}.0.gate_proj" in result.packed:
            continue  # MoE experts: written per expert, packed (transformers' fused gate_up_proj / down_proj)
        tensors[name] = tensor.detach().contiguous().clone()
    for module, packed in result.packed.items():
        for key, tensor in packed.items():
            tensors[f"{module}.{key}"] = tensor.contiguous()
    return tensors


def write_folder(out: Path, source: Path, model: nn.Module, result: QuantizedModel, spec: QuantSpec) -> Path:
    """Writes `out` (which must not exist or be empty); returns it."""
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out {out} exists and is not empty; choose a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        config = model.config.to_dict()
        config["quantization_config"] = quantization_config(spec.bits, spec.group_size, spec.sym, spec.uses_g_idx,
                                                            spec.format, spec.static_groups)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(checkpoint_tensors(model, result), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / name)
        for path in (tmp, *tmp.iterdir()):  # mkdtemp makes the folder private: make it like any other
            path.chmod(0o755 if path.is_dir() else 0o644)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out

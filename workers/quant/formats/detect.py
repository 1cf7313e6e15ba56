"""Which layout a checkpoint's quantized layers use, from its folder and the configured method.

A folder says how it was quantized in config.json's `quantization_config` (or, for older GPTQ
folders, quantize_config.json); a GGUF file by the block type of its projections. `resolve_layout` combines that with `ModelConfig.quantization`:
  - folder quantized, config null or naming the same thing (int4 for GPTQ/AWQ 4-bit, int8 for
    8-bit, fp8 for FP8) -> the folder's layout;
  - folder float, config int8 | int4 | fp8 -> quantization at load (at_load.py);
  - anything else -> an error naming both the configured value and the folder's format.
`quantization_config` writes the entry `shardserve quantize` puts in a folder it writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from shardserve.workers.config import QUANTIZATION_METHODS
from shardserve.workers.quant.formats.at_load import AtLoadLayout
from shardserve.workers.quant.formats.awq import AwqLayout
from shardserve.workers.quant.formats.compressed import CompressedLayout, PackQuantizedLayout
from shardserve.workers.quant.formats.gguf import GgufLayout, projection_block_type
from shardserve.workers.quant.formats.gguf_kquant import GgufKLayout
from shardserve.workers.quant.formats.gptq import GptqLayout
from shardserve.workers.quant.formats.layout import CheckpointLayout

METHODS = QUANTIZATION_METHODS


def folder_quantization(folder: Path | None, hf_config: Any = None) -> dict[str, Any] | None:
    """The folder's quantization_config (config.json, else quantize_config.json), or None."""
    entry = getattr(hf_config, "quantization_config", None) if hf_config is not None else None
    if entry is None and folder is not None and (folder / "config.json").is_file():
        entry = json.loads((folder / "config.json").read_text()).get("quantization_config")
    if entry is None and folder is not None and (folder / "quantize_config.json").is_file():
        entry = {"quant_method": "gptq", **json.loads((folder / "quantize_config.json").read_text())}
    if entry is not None and not isinstance(entry, dict):
        entry = entry.to_dict() if hasattr(entry, "to_dict") else dict(entry)
    return entry


PACKED_BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}


def gguf_quantization(path: Path) -> dict[str, Any] | None:
    """A GGUF file whose projections are all Q4_0, Q4_1 or Q8_0 blocks, or Q4_K / Q6_K, is read packed."""
    block = projection_block_type(path)
    return None if block is None else {"quant_method": "gguf", "block_type": block}


def folder_layout(entry: dict[str, Any]) -> tuple[CheckpointLayout, str]:
    """(layout, what it is in words: e.g. 'gptq 4-bit g128', and the at-load method it matches)."""
    method = str(entry.get("quant_method", "")).lower()
    if method == "gptq":
        fmt = str(entry.get("checkpoint_format", "gptq")).lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"GPTQ checkpoint_format {fmt!r} is not supported (gptq, gptq_v2)")
        bits, group = int(entry.get("bits", 4)), int(entry.get("group_size", 128))
        check_group(group, "quantization_config.group_size")
        layout = GptqLayout(bits, group, bool(entry.get("desc_act", False)), v2=fmt == "gptq_v2")
        return layout, f"int{bits}"
    if method == "awq":
        version = str(entry.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"AWQ version {version!r} is not supported (gemm)")
        if not entry.get("zero_point", True):
            raise ValueError("AWQ without zero_point is not supported")
        bits = int(entry.get("bits", entry.get("w_bit", 4)))
        group = int(entry.get("group_size", entry.get("q_group_size", 128)))
        check_group(group, "quantization_config.group_size")
        return AwqLayout(bits, group), "int4"
    if method == "compressed-tensors":
        return compressed_layout(entry)
    if method == "gguf":
        block = str(entry["block_type"])
        if block not in PACKED_BITS:  # k-quants: 'Q4_K', 'Q6_K' or 'Q4_K+Q6_K' (formats/gguf_kquant.py)
            return GgufKLayout(block), "int4" if "Q4_K" in block else "int8"
        return GgufLayout(PACKED_BITS[block], block), "int4" if PACKED_BITS[block] == 4 else "int8"
    raise ValueError(f"checkpoint quantization method {method!r} is not supported "
                     "(gptq, awq, compressed-tensors, gguf)")


def compressed_layout(entry: dict[str, Any]) -> tuple[CheckpointLayout, str]:
    groups = entry.get("config_groups") or {}
    if len(groups) != 1:
        raise ValueError(f"compressed-tensors folders with {len(groups)} config_groups are not supported (1)")
    group = next(iter(groups.values()))
    weights = group.get("weights") or {}
    bits, kind = int(weights.get("num_bits", 0)), str(weights.get("type", ""))
    strategy = str(weights.get("strategy", ""))
    fmt = str(group.get("format") or entry.get("format") or "")
    acts = group.get("input_activations")
    if fmt == "pack-quantized":
        if acts is not None:
            raise ValueError("compressed-tensors pack-quantized folders with quantized activations are not "
                             "supported (weight-only: input_activations null)")
        if bits not in (4, 8) or kind != "int" or strategy not in ("channel", "group"):
            raise ValueError(f"compressed-tensors pack-quantized weights {bits}-bit {kind} per {strategy} are not "
                             "supported (4 or 8-bit int, per channel or per group)")
        group_size = -1 if strategy == "channel" else int(weights.get("group_size") or 0)
        check_group(group_size, "quantization_config.config_groups.weights.group_size")
        sym = bool(weights.get("symmetric", True))
        return PackQuantizedLayout(bits, group_size, sym), f"int{bits}"
    if fmt not in ("", "int-quantized", "float-quantized", "naive-quantized"):
        raise ValueError(f"compressed-tensors format {fmt!r} is not supported "
                         "(int-quantized, float-quantized, naive-quantized, pack-quantized)")
    if bits != 8 or kind not in ("int", "float") or strategy not in ("channel", "tensor"):
        raise ValueError(f"compressed-tensors weights {bits}-bit {kind} per {strategy} are not supported "
                         "(8-bit int or float, per channel or per tensor)")
    if not weights.get("symmetric", True):
        raise ValueError("compressed-tensors asymmetric 8-bit weights are not supported")
    if acts is not None and kind == "int":
        raise ValueError("compressed-tensors INT8 weights with quantized activations (W8A8) are not supported: "
                         "INT8 runs weight-only (W8A16); a folder whose input_activations is null loads")
    if acts is not None and not acts.get("dynamic", False):
        raise ValueError("compressed-tensors static activation scales are not supported (dynamic only)")
    kind_name = "int8" if kind == "int" else "fp8"
    return CompressedLayout(kind_name), kind_name


def check_group(group: int, field: str) -> None:
    if group not in (-1, 32, 64, 128):
        raise ValueError(f"{field} must be 32, 64, 128 or -1, got {group}")


def resolve_layout(requested: str | None, entry: dict[str, Any] | None, params_dtype: torch.dtype,
                   group_size: int = 128) -> CheckpointLayout | None:
    """The layout of the quantized linear layers, or None for plain float weights."""
    if requested is not None and requested not in METHODS:
        raise ValueError(f"quantization must be one of {METHODS} or null, got {requested!r}")
    if entry is None:
        if requested is None:
            return None
        if requested in ("int8", "int4", "fp8"):
            check_group(group_size, "quantization_group_size")
            return AtLoadLayout(requested, params_dtype, group_size)
        raise ValueError(f"quantization: {requested} needs a {requested} checkpoint, but this one is not "
                         f"quantized (use int4 / int8 / fp8 to quantize it at load, or `shardserve quantize`)")
    layout, matches = folder_layout(entry)
    folder_method = str(entry.get("quant_method")).lower()
    if requested not in (None, folder_method, matches):
        raise ValueError(f"quantization: {requested} contradicts the checkpoint, which is {layout.name} "
                         f"({matches}) per its quantization_config")
    return layout


def quantization_config(bits: int, group_size: int, sym: bool, desc_act: bool, method: str,
                        static_groups: bool = False) -> dict[str, Any]:
    """The config.json entry of a folder written in the GPTQ or AWQ layout (desc_act: g_idx is not k // g)."""
    if method == "gptq":
        return {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act,
                "sym": sym, "checkpoint_format": "gptq", "static_groups": static_groups, "true_sequential": True}
    if method == "awq":
        return {"quant_method": "awq", "bits": bits, "group_size": group_size, "zero_point": True,
                "version": "gemm"}
    raise ValueError(f"method must be gptq or awq, got {method!r}")

"""Test helper: rewrite a float Hugging Face folder into a quantized layout (GPTQ, AWQ, compressed-tensors).

Every decoder projection (q/k/v/o/gate/up/down, MoE experts and shared experts included) is rounded to
nearest (workers/quant/algorithms/rtn.py) and written per module with the layout's `pack`, as GPTQModel /
AutoAWQ / llm-compressor name them (`...experts.7.down_proj.qweight`); config.json gets the matching
`quantization_config`. `dequantize_folder` writes the float folder of a quantized one's own dequantized
weights: the reference the quantized model is compared against. The
`shardserve quantize` command writes the same layouts with better algorithms; tests use this to
get small quantized folders fast.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from shardserve.workers.quant.algorithms.rtn import rtn_fp8, rtn_grouped, rtn_int8
from shardserve.workers.quant.formats.awq import AwqLayout
from shardserve.workers.quant.formats.compressed import CompressedLayout, PackQuantizedLayout
from shardserve.workers.quant.formats.detect import quantization_config
from shardserve.workers.quant.formats.gptq import GptqLayout

# Decoder projections: attention, dense MLPs, MoE experts (Qwen and Mixtral names) and Qwen2-MoE shared
# experts; the router (mlp.gate) and the shared expert's gate stay float, as GPTQModel / llm-compressor leave them.
PROJ = re.compile(r"^(model\.layers\.\d+\.(?:(?:self_attn|mlp(?:\.shared_expert|\.experts\.\d+)?)"
                  r"\.(?:q|k|v|o|gate|up|down)_proj|block_sparse_moe\.experts\.\d+\.w[123]))\.weight$")


def pack_quantized_config(bits: int, group_size: int, sym: bool) -> dict:
    """compressed-tensors W4A16 / W8A16 (pack-quantized) as llm-compressor writes it."""
    weights = {"num_bits": bits, "type": "int", "symmetric": sym, "dynamic": False,
               "strategy": "channel" if group_size == -1 else "group",
               "group_size": None if group_size == -1 else group_size}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None, "weights": weights}},
            "ignore": ["lm_head"]}


def compressed_config(kind: str, strategy: str) -> dict:
    return {"quant_method": "compressed-tensors", "format": f"{'int' if kind == 'int8' else 'float'}-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None,
                                          "weights": {"num_bits": 8, "type": "int" if kind == "int8" else "float",
                                                      "strategy": strategy, "symmetric": True}}},
            "ignore": ["lm_head"]}


def quantize_folder(src: Path, dst: Path, method: str, group_size: int = 32, sym: bool = True,
                    desc_act: bool = False, bits: int = 4, strategy: str = "channel",
                    keep_float: Callable[[str], bool] | None = None, config_extra: dict | None = None) -> Path:
    """method: gptq | awq | int8 (compressed-tensors) | fp8 (compressed-tensors) | packed (compressed-tensors
    pack-quantized, `bits` 4 or 8). keep_float(module) leaves a projection float (the caller lists it in the
    config's ignore list through `config_extra`, merged into quantization_config)."""
    dst.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for file in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(file))
    out = {}
    for name, w in tensors.items():
        match = PROJ.match(name)
        if match is None or (keep_float is not None and keep_float(match.group(1))):
            out[name] = w
            continue
        prefix = match.group(1)
        if method == "packed":
            packed = PackQuantizedLayout(bits, group_size, sym).pack(rtn_grouped(w, group_size, bits=bits, sym=sym))
        elif method in ("gptq", "awq"):
            layout = GptqLayout(bits, group_size, desc_act) if method == "gptq" else AwqLayout(4, group_size)
            qw = rtn_grouped(w, group_size, bits=bits, sym=sym)
            if desc_act:  # a reproducible act-order: columns grouped by a fixed permutation
                # one order per input, as GPTQ sorts by the input's Hessian: q/k/v share it, gate/up too
                key = re.sub(r"\.(?:gate_proj|up_proj|w1|w3)$", ".gate_up", prefix)
                key = re.sub(r"\.(?:q|k|v)_proj$", ".qkv", key)
                seed = sum(map(ord, key))
                perm = torch.randperm(w.shape[1], generator=torch.Generator().manual_seed(seed))
                qw = rtn_grouped(w[:, perm], group_size, bits=bits, sym=sym)
                qw.perm = perm
            packed = layout.pack(qw)
        else:
            qw = rtn_int8(w) if method == "int8" else rtn_fp8(w)
            packed = CompressedLayout(method).pack(qw)
            if strategy == "tensor":  # one scale per tensor: requantize to the largest
                scale = qw.scales.max()
                q = (qw.dequantize() / scale)
                q = q.round().clamp(-127, 127).to(torch.int8) if method == "int8" else q.to(torch.float8_e4m3fn)
                packed = {"weight": q, "weight_scale": scale.reshape(1)}
        out.update({f"{prefix}.{key}": value for key, value in packed.items()})
    save_file({k: v.contiguous() for k, v in out.items()}, str(dst / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = (quantization_config(bits, group_size, sym, desc_act, method)
                                     if method in ("gptq", "awq") else pack_quantized_config(bits, group_size, sym)
                                     if method == "packed" else compressed_config(method, strategy))
    config["quantization_config"].update(config_extra or {})
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for extra in src.iterdir():
        if extra.suffix != ".safetensors" and extra.name != "config.json" and extra.is_file():
            shutil.copy(extra, dst / extra.name)
    return dst


def dequantize_folder(quantized: Path, float_src: Path, dst: Path) -> Path:
    """The float folder of `quantized`'s own dequantized weights (its layout's `unpack`): the reference a
    quantized model must match. `float_src` gives each module's [N, K] (the folder it was written from)."""
    from shardserve.workers.quant.formats.detect import folder_layout

    dst.mkdir(parents=True, exist_ok=True)
    config = json.loads((quantized / "config.json").read_text())
    layout, _ = folder_layout(config.pop("quantization_config"))
    shapes = {name[: -len(".weight")]: w.shape for file in sorted(float_src.glob("*.safetensors"))
              for name, w in load_file(file).items() if name.endswith(".weight")}
    tensors = load_file(quantized / "model.safetensors")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    out = {}
    keys = set(layout.tensors(256, 256))  # the layout's tensor names (biases, float weights pass through)
    for name, t in tensors.items():
        module, _, key = name.rpartition(".")
        if module in shapes and key in keys and not (key == "weight" and t.is_floating_point()
                                                     and t.element_size() > 1):
            modules.setdefault(module, {})[key] = t
        else:
            out[name] = t
    for module, parts in modules.items():
        n, k = shapes[module]
        specs = layout.tensors(k, n)
        fitted = {key: (parts[key].reshape(-1).expand(spec.shape).contiguous() if parts[key].numel() == 1
                        else parts[key].reshape(spec.shape)) for key, spec in specs.items()}
        out[f"{module}.weight"] = layout.unpack(fitted).dequantize(torch.float32)
    save_file({k: v.contiguous() for k, v in out.items()}, str(dst / "model.safetensors"))
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst

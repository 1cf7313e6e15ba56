"""Test helper: rewrite a float Hugging Face folder into a quantized layout (GPTQ, AWQ, compressed-tensors).

Every decoder projection (q/k/v/o/gate/up/down) is rounded to nearest (workers/quant/algorithms/rtn.py)
and written with the layout's `pack`; config.json gets the matching `quantization_config`. The
`shardserve quantize` command writes the same layouts with better algorithms; tests use this to
get small quantized folders fast.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from shardserve.workers.quant.algorithms.rtn import rtn_fp8, rtn_grouped, rtn_int8
from shardserve.workers.quant.formats.awq import AwqLayout
from shardserve.workers.quant.formats.compressed import CompressedLayout
from shardserve.workers.quant.formats.detect import quantization_config
from shardserve.workers.quant.formats.gptq import GptqLayout

PROJ = re.compile(r"^(model\.layers\.\d+\.(?:self_attn|mlp)\.(?:q|k|v|o|gate|up|down)_proj)\.weight$")


def compressed_config(kind: str, strategy: str) -> dict:
    return {"quant_method": "compressed-tensors", "format": f"{'int' if kind == 'int8' else 'float'}-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None,
                                          "weights": {"num_bits": 8, "type": "int" if kind == "int8" else "float",
                                                      "strategy": strategy, "symmetric": True}}},
            "ignore": ["lm_head"]}


def quantize_folder(src: Path, dst: Path, method: str, group_size: int = 32, sym: bool = True,
                    desc_act: bool = False, bits: int = 4, strategy: str = "channel") -> Path:
    """method: gptq | awq | int8 (compressed-tensors) | fp8 (compressed-tensors)."""
    dst.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for file in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(file))
    out = {}
    for name, w in tensors.items():
        match = PROJ.match(name)
        if match is None:
            out[name] = w
            continue
        prefix = match.group(1)
        if method in ("gptq", "awq"):
            layout = GptqLayout(bits, group_size, desc_act) if method == "gptq" else AwqLayout(4, group_size)
            qw = rtn_grouped(w, group_size, bits=bits, sym=sym)
            if desc_act:  # a reproducible act-order: columns grouped by a fixed permutation
                perm = torch.randperm(w.shape[1], generator=torch.Generator().manual_seed(len(name)))
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
                                     if method in ("gptq", "awq") else compressed_config(method, strategy))
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for extra in src.iterdir():
        if extra.suffix != ".safetensors" and extra.name != "config.json" and extra.is_file():
            shutil.copy(extra, dst / extra.name)
    return dst

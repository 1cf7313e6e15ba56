"""A GPTQ folder written by GPTQModel itself (tests/data/gptqmodel_tiny, made by
tests/data/make_gptqmodel_reference.py: 4-bit, groups of 32, asymmetric, act-order g_idx) loads in our
engine (issue 22, item 2):
  - the layout detected from its config.json unpacks every decoder linear to exactly the weights
    GPTQModel's own `dequantize_weight()` gives (stored beside the folder when it was written);
  - our model loaded from the folder (loader, linear-method slot, CPU 4-bit runtime) gives the logits
    of transformers' Llama holding those dequantized weights.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from paged_helper import PagedBatch
from safetensors.torch import load_file
from shardserve.workers.config import ModelConfig
from shardserve.workers.models.loader import load_model
from shardserve.workers.quant.formats.detect import folder_layout
from shardserve.workers.quant.formats.gptq import GptqLayout
from transformers import LlamaConfig, LlamaForCausalLM

FOLDER = Path(__file__).resolve().parents[1] / "data" / "gptqmodel_tiny"
PROJ = re.compile(r"^(model\.layers\.\d+\.(?:self_attn|mlp)\.(?:q|k|v|o|gate|up|down)_proj)\.qweight$")


def _reference() -> dict[str, torch.Tensor]:
    """GPTQModel's dequantized weights, as our [N, K]."""
    return {name: w.t().contiguous() for name, w in load_file(str(FOLDER / "reference_weights.safetensors")).items()}


def test_unpacked_weights_equal_gptqmodel_dequantization() -> None:
    entry = json.loads((FOLDER / "config.json").read_text())["quantization_config"]
    layout, kind = folder_layout(entry)
    assert isinstance(layout, GptqLayout) and kind == "int4" and layout.desc_act and layout.group_size == 32
    tensors = load_file(str(FOLDER / "model.safetensors"))
    reference = _reference()
    modules = sorted(m.group(1) for name in tensors if (m := PROJ.match(name)))
    assert modules == sorted(reference) and len(modules) == 14
    act_ordered = 0
    for module in modules:
        expected = reference[module]
        specs = layout.tensors(expected.shape[1], expected.shape[0])
        unpacked = layout.unpack({key: tensors[f"{module}.{key}"] for key in specs})
        act_ordered += unpacked.perm is not None
        # GPTQModel computes (q - z) * scale in float16: one fp16 rounding (2**-11 relative) apart, while a
        # wrong code, zero point or group moves a weight by a whole step (~7 % of its group's range)
        torch.testing.assert_close(unpacked.dequantize(), expected, rtol=2**-10, atol=1e-7)
    assert act_ordered == len(modules)  # GPTQModel's g_idx really permutes every layer


def test_forward_matches_transformers_with_gptqmodel_weights() -> None:
    ours = load_model(ModelConfig(model=str(FOLDER), dtype="float32", device="cpu"), torch.device("cpu"),
                      torch.float32)
    config = LlamaConfig.from_pretrained(str(FOLDER))
    del config.quantization_config
    config._attn_implementation = "eager"
    hf = LlamaForCausalLM(config).eval()
    state = {name: w for name, w in load_file(str(FOLDER / "model.safetensors")).items() if "_proj." not in name}
    state.update({f"{name}.weight": w for name, w in _reference().items()})
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and not [m for m in missing if "rotary" not in m], (missing, unexpected)
    ids = torch.randint(2, 256, (11,), generator=torch.Generator().manual_seed(0)).tolist()
    (hidden,) = PagedBatch(ours.model).step([("a", ids)])
    logits = ours.model.compute_logits(hidden)  # [11, vocab]
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0].float()
    # GPTQ scales are fp16 in the folder, so the CPU kernels' fp16 scale and minimum are close to exact
    torch.testing.assert_close(logits, expected, atol=2e-3 * float(expected.abs().max()), rtol=0)

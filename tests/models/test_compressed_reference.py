"""compressed-tensors folders written by compressed-tensors itself load in our engine (issue 22, item 2).

Each case (compressed_reference.py) writes a tiny Llama with the package's own quantization and
compression calls — INT8 per channel packed (llm-compressor's W8A16) and naive, FP8 with dynamic
activations, INT4 symmetric g128 (W4A16) and asymmetric g32 — and loads the folder back through
compressed-tensors' decompression (transformers, run_compressed=False) as the reference:
  - the layout our loader detects from config.json unpacks every decoder linear to exactly the
    weights compressed-tensors decompresses (one float rounding);
  - our model loaded from the folder (load_model: the layout, the linear-method slot, the CPU
    quantized runtime) gives the reference model's logits on a prompt.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from compressed_reference import SCHEMES, decompressed, write_reference
from paged_helper import PagedBatch
from safetensors.torch import load_file
from shardserve.workers.config import ModelConfig
from shardserve.workers.models.loader import LoadedModel, load_model
from shardserve.workers.quant.formats.compressed import CompressedLayout, PackQuantizedLayout
from shardserve.workers.quant.formats.detect import folder_layout

PROJ = re.compile(r"^(model\.layers\.\d+\.(?:self_attn|mlp)\.(?:q|k|v|o|gate|up|down)_proj)\.")
EXPECTED = {"int8_channel_packed": (PackQuantizedLayout, "int8"), "int8_channel_naive": (CompressedLayout, "int8"),
            "fp8_dynamic": (CompressedLayout, "fp8"), "w4a16_g128": (PackQuantizedLayout, "int4"),
            "w4a16_asym_g32": (PackQuantizedLayout, "int4")}

# Logits may differ by this much, relative to their largest magnitude: 8-bit and FP8 compute exactly
# what was decompressed (float rounding only); the 4-bit CPU kernels keep each group's scale and
# minimum in fp16 (cpu_kernels/packing.py), which rounds the float32 scales written here by up to
# 2**-11 relative (a wrong nibble, zero point or group index moves logits by more than 10 %).
# Measured: 8.4e-7 (INT8), 7.3e-4 (W4A16 g128), 2.0e-3 (asymmetric g32: the fp16 minimum is -z * scale).
TOLERANCE = {"int8_channel_packed": 2e-5, "int8_channel_naive": 2e-5, "fp8_dynamic": 2e-5, "w4a16_g128": 5e-3,
             "w4a16_asym_g32": 5e-3}


@dataclass
class Case:
    name: str
    folder: Path
    reference: torch.nn.Module


@pytest.fixture(scope="module", params=sorted(SCHEMES))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    folder = write_reference(request.param, tmp_path_factory.mktemp(request.param))
    return Case(request.param, folder, decompressed(folder))


def test_unpacked_weights_equal_compressed_tensors_decompression(case: Case) -> None:
    entry = json.loads((case.folder / "config.json").read_text())["quantization_config"]
    layout, kind = folder_layout(entry)
    expected_layout, expected_kind = EXPECTED[case.name]
    assert isinstance(layout, expected_layout) and kind == expected_kind
    tensors = load_file(str(case.folder / "model.safetensors"))
    modules = sorted({m.group(1) for name in tensors if (m := PROJ.match(name))})
    assert len(modules) == 14  # 7 projections x 2 layers, all compressed
    for module in modules:
        reference = case.reference.get_submodule(module).weight.detach().float()  # [N, K]
        specs = layout.tensors(reference.shape[1], reference.shape[0])
        assert set(specs) == {key[len(module) + 1:] for key in tensors if key.startswith(module + ".")}
        ours = layout.unpack({key: tensors[f"{module}.{key}"].reshape(spec.shape)
                              for key, spec in specs.items()}).dequantize()
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6 * float(reference.abs().max()))


def test_forward_matches_compressed_tensors_reference(case: Case) -> None:
    ours: LoadedModel = load_model(ModelConfig(model=str(case.folder), dtype="float32", device="cpu"),
                                   torch.device("cpu"), torch.float32)
    ids = torch.randint(0, 256, (11,), generator=torch.Generator().manual_seed(0)).tolist()
    (hidden,) = PagedBatch(ours.model).step([("a", ids)])
    logits = ours.model.compute_logits(hidden)  # [11, vocab]
    with torch.no_grad():
        expected = case.reference(torch.tensor([ids])).logits[0].float()
    scale = float(expected.abs().max())
    torch.testing.assert_close(logits, expected, atol=TOLERANCE[case.name] * scale, rtol=0)

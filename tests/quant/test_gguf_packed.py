"""GGUF blocks kept packed: the embedded SmolLM2 Q4_1 file read into grouped weights, no float copy.

The block split is checked against gguf-py's own `dequantize` (the llama.cpp project's reference)
for Q4_1 (the projections), Q8_0 (the file's embedding) and Q4_0 (blocks written by gguf-py's
`quantize`); the un-permuted q/k rows against transformers' GGUF loader; and the packed model
against today's dequantized path: the same greedy tokens on 20 prompts.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize, quantize
from shardserve.workers.llm import LLM
from shardserve.workers.models.gguf import read_gguf_config, read_gguf_tensors
from shardserve.workers.models.loader import default_model_path, gguf_float_folder
from shardserve.workers.quant.formats.gguf import GgufLayout, read_gguf_packed, split_blocks
from shardserve.workers.request import SamplingParams


def _tensor(name: str):
    return next(t for t in GGUFReader(str(default_model_path())).tensors if t.name == name)


def _dequantized(q, scales, mins, bits: int = 4) -> torch.Tensor:
    weight = GgufLayout(bits, "").unpack({"q": q, "scales": scales, "mins": mins})
    return weight.dequantize()


@pytest.mark.parametrize("name", ["blk.0.ffn_down.weight", "token_embd.weight"])
def test_split_blocks_equals_gguf_dequantize(name: str) -> None:
    tensor = _tensor(name)
    raw = np.asarray(tensor.data)[:256]
    block = tensor.tensor_type.name
    got = _dequantized(*split_blocks(raw, block), bits=8 if block == "Q8_0" else 4)
    want = torch.from_numpy(np.array(dequantize(raw, tensor.tensor_type)))
    assert torch.equal(got, want.float())


def test_q4_0_blocks_written_by_gguf_py() -> None:
    values = np.random.default_rng(0).standard_normal((16, 128)).astype(np.float32)
    raw = quantize(values, GGMLQuantizationType.Q4_0)
    got = _dequantized(*split_blocks(raw, "Q4_0"))
    assert torch.equal(got, torch.from_numpy(np.array(dequantize(raw, GGMLQuantizationType.Q4_0))).float())


def test_q_and_k_rows_match_transformers() -> None:
    path = default_model_path()
    config = read_gguf_config(path)
    want = read_gguf_tensors(path, config, torch.float32)
    fields: dict[str, torch.Tensor] = {}
    for name, tensor in read_gguf_packed(path, config, torch.float32):
        if name.startswith("model.layers.1."):
            fields[name] = tensor
        elif fields and not name.startswith("model.layers.1."):
            break
    for proj in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"):
        prefix = f"model.layers.1.{proj}"
        got = _dequantized(fields[f"{prefix}.q"], fields[f"{prefix}.scales"], fields[f"{prefix}.mins"])
        assert torch.allclose(got, want[f"{prefix}.weight"], atol=1e-6), proj


@pytest.mark.slow
def test_packed_q4_1_gives_the_dequantized_paths_greedy_tokens() -> None:
    prompts = [f"{topic} is" for topic in ("Paris", "The moon", "Python", "A cat", "Music", "Winter", "Bread",
                                             "The ocean", "Chess", "A river", "Gold", "Rain", "Tea", "A clock",
                                             "Snow", "The sun", "Glass", "A bridge", "Salt", "Wind")]
    params = SamplingParams(max_tokens=8, temperature=0)
    packed = LLM("default", quantization="gguf", cpu_activations="float")  # auto: int8, other rounding
    qkv = packed.engine.loaded.model.model.layers[0].self_attn.qkv_proj
    assert qkv.quant_method.layout.name == "gguf Q4_1" and "weight" not in dict(qkv.named_parameters())
    got = [o.outputs[0].token_ids for o in packed.generate(prompts, params)]
    del packed
    floats = LLM(str(gguf_float_folder(default_model_path())))
    want = [o.outputs[0].token_ids for o in floats.generate(prompts, params)]
    assert got == want

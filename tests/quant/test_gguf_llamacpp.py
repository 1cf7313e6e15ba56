"""A Q4_K_M file written by llama.cpp's own quantizer, read by our engine, against llama.cpp's own logits.

tests/data/tiny_llama_q4_k_m.gguf (a 2-layer random Llama quantized by llama_cpp.llama_model_quantize:
Q4_K, with Q6_K for layer 1's attn_v / ffn_down and the LM head) and the logits llama.cpp computed for
it and for a copy dequantized to F32 (tests/data/make_kquant_llama.py; llama.cpp is not needed here).
Our engine scores the same prompt with `quantization: gguf` (projections, Q4_K embedding and Q6_K LM
head kept packed) and without (dequantized fp32): both match llama.cpp on the dequantized copy to 5e-4 (same weights, float
activations: measured 7e-5) and each other to 1e-4. Against llama.cpp on the Q4_K_M file itself the
gap is llama.cpp's rounding of activations to Q8_K for k-quant dot products: llama.cpp's own two runs
differ by 0.31 max / 0.062 mean in log-probs, and so do we (0.31 / 0.062), so the bound is 0.45 / 0.1,
with the same top-1 token wherever llama.cpp's top two are more than 0.3 apart.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from shardserve.workers.llm import LLM
from shardserve.workers.models.gguf_tables import PackedEmbedding, PackedTableHead
from shardserve.workers.quant.cpu_kernels.kquant import KquantRuntime
from shardserve.workers.quant.stacked import StackedRuntime

DATA = Path(__file__).resolve().parents[1] / "data"
FILE, REFERENCE = DATA / "tiny_llama_q4_k_m.gguf", DATA / "tiny_llama_q4_k_m.json"


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(REFERENCE.read_text())


@pytest.fixture(scope="module")
def scores(reference: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """Our log-probs of the prompt's tokens 1.. under each way of reading the file."""
    cache = str(tmp_path_factory.mktemp("cache"))
    packed = LLM(str(FILE), quantization="gguf", gguf_cache_dir=cache, cpu_activations="float")
    model = packed.engine.loaded.model
    layers = model.model.layers
    assert isinstance(layers[0].self_attn.qkv_proj.quant_method.runtime, KquantRuntime)  # q, k, v Q4_K
    assert isinstance(layers[1].self_attn.qkv_proj.quant_method.runtime, StackedRuntime)  # q, k Q4_K + v Q6_K
    assert layers[1].mlp.down_proj.quant_method.runtime.packed.__class__.__name__ == "PackedQ8G16"  # Q6_K
    embed, head = model.model.embed_tokens, model.lm_head  # the tables in their blocks too (gguf_tables.py)
    assert isinstance(embed, PackedEmbedding) and embed.table.block_type == "Q4_K"
    assert isinstance(head, PackedTableHead) and head.table.block_type == "Q6_K" and model.cpu_lm_head is head
    out = {"packed": packed.score(reference["prompt"])}
    del packed
    out["dequantized"] = LLM(str(FILE), gguf_cache_dir=cache).score(reference["prompt"])
    return out


def _log_probs(logits: list[list[float]]) -> torch.Tensor:
    return torch.log_softmax(torch.tensor(logits), dim=-1)[:-1]  # row i predicts token i + 1, as score()


def test_the_file_is_llama_cpps_q4_k_m_mix(reference: dict) -> None:
    types = reference["tensor_types"]
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
    assert (types["blk.0.attn_v.weight"], types["blk.1.attn_v.weight"]) == ("Q4_K", "Q6_K")
    assert (types["blk.0.ffn_down.weight"], types["blk.1.ffn_down.weight"]) == ("Q4_K", "Q6_K")


@pytest.mark.parametrize("path", ["packed", "dequantized"])
def test_logits_equal_llama_cpp_on_the_same_weights(scores: dict[str, torch.Tensor], reference: dict,
                                                     path: str) -> None:
    want = _log_probs(reference["dequantized_logits"])
    assert (scores[path] - want).abs().max() < 5e-4


def test_kept_packed_equals_dequantized(scores: dict[str, torch.Tensor]) -> None:
    assert (scores["packed"] - scores["dequantized"]).abs().max() < 1e-4


def test_logits_match_llama_cpp_on_the_q4_k_m_file_within_its_activation_rounding(
        scores: dict[str, torch.Tensor], reference: dict) -> None:
    want, own_gap = _log_probs(reference["logits"]), _log_probs(reference["dequantized_logits"])
    own = (want - own_gap).abs()
    assert 0.1 < own.max() < 0.45 and own.mean() < 0.1  # llama.cpp's Q8_K activations vs its float ones
    gap = (scores["packed"] - want).abs()
    assert gap.max() < 0.45 and gap.mean() < 0.1
    top2 = want.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.3
    assert clear.sum() >= 5
    assert torch.equal(scores["packed"].argmax(-1)[clear], want.argmax(-1)[clear])

"""GGUF Q4_K / Q6_K kept packed (formats/gguf_kquant.py, cpu_kernels/kquant.cpp) against gguf-py.

Random valid super-blocks (tests/gguf_kquant_files.py; gguf-py cannot quantize k-quants) are split into
grouped fields whose dequantized weights, and those of the CPU packed forms, equal gguf-py's
`dequantize` bit for bit in fp32; the C++ kernels (float and int8 activations, AVX2 and scalar)
match x @ w.T; a merged layer mixing Q4_K and Q6_K rows becomes a StackedWeight; a row-parallel
rank's slice takes whole 32-input sub-blocks and a cut one is refused; a tiny Llama GGUF mixing
Q4_K and Q6_K (q/k Q4_K, v Q6_K in one qkv; a Q6_K LM head) generates the dequantized path's greedy tokens and
top-5 logprobs (within 1e-4); a file with a Q5_K projection is refused by `quantization: gguf`,
naming the tensor; `cpu_activations: int8` reaches every k-quant runtime (stacked parts included).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize
from gguf_kquant_files import MIXED, random_blocks, write_tiny_llama
from shardserve.parallel.quant import ShardSlice
from shardserve.workers.llm import LLM
from shardserve.workers.quant.cpu_kernels import best_isa
from shardserve.workers.quant.cpu_kernels.kquant import KquantRuntime, kquant_linear
from shardserve.workers.quant.formats.gguf_kblocks import split_kquant
from shardserve.workers.quant.formats.gguf_kquant import GgufKLayout
from shardserve.workers.quant.method import QuantLinearMethod
from shardserve.workers.quant.stacked import StackedRuntime
from shardserve.workers.quant.weights import GroupedWeight, StackedWeight
from shardserve.workers.request import SamplingParams
from torch import nn

BLOCKS = ["Q4_K", "Q6_K"]


def _reference(raw: np.ndarray, block: str) -> torch.Tensor:
    return torch.from_numpy(np.array(dequantize(raw, GGMLQuantizationType[block])))


@pytest.mark.parametrize("block", BLOCKS)
def test_split_and_packed_forms_equal_gguf_dequantize_bit_for_bit(block: str) -> None:
    raw = random_blocks(block, 32, 768, np.random.default_rng(0))
    at = 0 if block == "Q4_K" else 208  # d of the first super-block: a zero and a negative d are blocks too
    raw[0, at:at + 2] = np.array([-0.0], dtype=np.float16).view(np.uint8)
    raw[1, at:at + 2] = np.array([-3e-4], dtype=np.float16).view(np.uint8)
    want = _reference(raw, block)
    w = GgufKLayout(block).unpack(split_kquant(raw, block))
    assert isinstance(w, GroupedWeight) and w.float32_scales
    assert (w.bits, w.group_size) == ((4, 32) if block == "Q4_K" else (6, 16))
    assert torch.equal(w.dequantize(), want)
    assert torch.equal(KquantRuntime(w).packed.dequantize(), want)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("int8_activations", [False, True])
def test_cpu_kernels_match_the_dequantized_matmul(block: str, int8_activations: bool) -> None:
    raw = random_blocks(block, 40, 512, np.random.default_rng(1))
    w = GgufKLayout(block).unpack(split_kquant(raw, block))
    packed = KquantRuntime(w).packed
    x, bias = torch.randn(3, 512), torch.randn(40)
    ref = (x.double() @ _reference(raw, block).double().T + bias.double()).float()
    tol = 2e-2 if int8_activations else 1e-5  # int8 activations round x (~0.5 % of |y|, as llama.cpp does)
    isas = ["scalar"] + (["avx2"] if best_isa() != "scalar" else [])
    for isa in isas:
        y = kquant_linear(x, packed, bias, isa=isa, int8_activations=int8_activations)
        assert (y - ref).abs().max() <= tol * ref.abs().max(), isa
    dense = kquant_linear(torch.randn(20, 512), packed)  # prefill rows: one dequantized F.linear
    assert dense.shape == (20, 40)


def _layer_fields(raw_by_block: list[tuple[np.ndarray, str]]) -> dict[str, torch.Tensor]:
    parts = [split_kquant(raw, block) for raw, block in raw_by_block]
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def test_a_merged_layer_mixing_q4_k_and_q6_k_is_stacked() -> None:
    rng = np.random.default_rng(2)
    raws = [(random_blocks("Q4_K", 16, 256, rng), "Q4_K"), (random_blocks("Q4_K", 8, 256, rng), "Q4_K"),
            (random_blocks("Q6_K", 8, 256, rng), "Q6_K")]
    w = GgufKLayout("Q4_K+Q6_K").unpack(_layer_fields(raws))
    assert isinstance(w, StackedWeight) and [p.bits for p in w.parts] == [4, 6]
    want = torch.cat([_reference(raw, block) for raw, block in raws])
    assert torch.equal(w.dequantize(), want)
    method = QuantLinearMethod(GgufKLayout("Q4_K+Q6_K"))
    runtime = StackedRuntime([KquantRuntime(p) for p in w.parts], [p.q.shape[0] for p in w.parts])
    x, bias = torch.randn(2, 256), torch.randn(32)
    assert torch.allclose(runtime(x, bias), x @ want.T + bias, rtol=1e-5, atol=1e-4)
    runtime.int8_activations = True  # cpu_activations: int8 reaches every part
    assert all(p.int8_activations for p in runtime.parts) and method.layout.name == "gguf Q4_K+Q6_K"


def _load_rank_slice(fields: dict[str, torch.Tensor], n: int, k: int, start: int, size: int) -> QuantLinearMethod:
    """A row-parallel rank's layer holding inputs [start, start + size), loaded as the loader does."""
    layer, method = nn.Module(), QuantLinearMethod(GgufKLayout("Q4_K+Q6_K"))
    layer.params_dtype = torch.float32
    method.create_weights(layer, size, [n], torch.float32)
    for name, tensor in fields.items():
        method.load_shard(getattr(layer, name), tensor, ShardSlice("input", start, 0, size))
    method.finish_loading(layer)
    return method


def test_tensor_parallel_ranks_take_whole_sub_blocks_and_a_cut_one_is_refused() -> None:
    rng = np.random.default_rng(3)
    raws = [(random_blocks("Q4_K", 16, 512, rng), "Q4_K"), (random_blocks("Q6_K", 16, 512, rng), "Q6_K")]
    fields, want = _layer_fields(raws), torch.cat([_reference(raw, block) for raw, block in raws])
    x = torch.randn(1, 512)
    for rank in range(2):
        cols = slice(rank * 256, (rank + 1) * 256)
        method = _load_rank_slice(fields, 32, 512, rank * 256, 256)
        assert torch.allclose(method.apply(None, x[:, cols], None), x[:, cols] @ want[:, cols].T, atol=1e-4)
    with pytest.raises(ValueError, match="whole 32-input sub-blocks"):
        _load_rank_slice(fields, 32, 512, 0, 496)  # e.g. 3 ranks of K = 1488 would cut a sub-block
    with pytest.raises(ValueError, match="cannot take the slice of 32 features at 16"):
        _load_rank_slice(fields, 32, 512, 16, 32)


def test_tiny_q4_k_m_llama_gives_the_dequantized_paths_greedy_tokens(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "tiny-q4_k_m.gguf", MIXED)
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=5)
    prompts = ["Paris is", "The moon and the", "A cat sat on", "1, 2, 3,"]
    packed = LLM(str(path), quantization="gguf", gguf_cache_dir=str(tmp_path / "cache"), cpu_activations="float")
    layers = packed.engine.loaded.model.model.layers
    qkv0, qkv1 = layers[0].self_attn.qkv_proj, layers[1].self_attn.qkv_proj
    assert qkv0.quant_method.layout.name == "gguf Q4_K+Q6_K" and not list(qkv0.named_parameters())
    assert isinstance(qkv0.quant_method.runtime, StackedRuntime)  # q, k Q4_K + v Q6_K
    assert isinstance(qkv1.quant_method.runtime, KquantRuntime)  # all Q4_K in layer 1
    assert not packed.engine.loaded.model.config.tie_word_embeddings  # output.weight Q6_K, read dequantized
    got = [o.outputs[0] for o in packed.generate(prompts, params)]
    del packed
    floats = LLM(str(path), gguf_cache_dir=str(tmp_path / "cache"))  # quantization null: dequantized fp32
    want = [o.outputs[0] for o in floats.generate(prompts, params)]
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    for g, w in zip(got, want, strict=True):  # the top-5 logprobs too: same weights, other summation order
        for g_top, w_top in zip(g.logprobs, w.logprobs, strict=True):
            assert set(g_top) == set(w_top)
            assert max(abs(g_top[t].logprob - w_top[t].logprob) for t in w_top) < 1e-4


def test_a_projection_of_another_k_quant_is_refused_by_name(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "tiny-q5.gguf", {**MIXED, "blk.1.ffn_down": "Q5_K"}, tokenizer=False)
    with pytest.raises(ValueError, match=r"blk\.1\.ffn_down\.weight is Q5_K"):
        LLM(str(path), quantization="gguf", gguf_cache_dir=str(tmp_path / "cache"))


def test_int8_activations_reach_every_k_quant_part(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "tiny-q4_k_m.gguf", MIXED)
    llm = LLM(str(path), quantization="gguf", gguf_cache_dir=str(tmp_path / "cache"), cpu_activations="int8")
    runtimes = [m.quant_method.runtime for m in llm.engine.loaded.model.modules()
                if getattr(m, "quant_method", None) is not None]
    parts = [p for r in runtimes for p in (r.parts if isinstance(r, StackedRuntime) else [r])]
    assert len(runtimes) == 8 and all(isinstance(p, KquantRuntime) and p.int8_activations for p in parts)
    out = llm.generate(["Paris is"], SamplingParams(max_tokens=4, temperature=0))[0].outputs[0]
    assert len(out.token_ids) == 4

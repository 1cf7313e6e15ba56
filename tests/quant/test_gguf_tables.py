"""GGUF embedding / LM head tables kept in their blocks on CPU (quant/formats/gguf_tables.py, models/gguf_tables.py).

Each block type (Q8_0, Q4_0, Q4_1 quantized by gguf-py; Q4_K, Q6_K random valid super-blocks) packs
into a table whose looked-up rows equal gguf-py's `dequantize` bit for bit and whose logits match
x @ w.T (float activations 1e-5, int8 2e-2 of the largest). A tied tiny Llama (one Q6_K token_embd,
no output.weight) and an untied one (Q4_K embedding, Q6_K head) load with `quantization: gguf` holding
no float table — one PackedTable serves both ends where tied — and score a prompt as the dequantized
path does (1e-4); `cpu_activations: int8` reaches the packed head; F16 tables stay float modules.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize
from gguf_kquant_files import MIXED, random_blocks, write_tiny_llama
from shardserve.parallel.embedding import VocabParallelEmbedding
from shardserve.workers.llm import LLM
from shardserve.workers.models.gguf_tables import PackedEmbedding, PackedTableHead
from shardserve.workers.quant.formats.gguf_tables import TABLE_TYPES, pack_table

PROMPT = [1, 300, 45, 270, 99, 311, 23, 301, 17, 380, 4000, 2]


def _raw(block: str, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    if block.endswith("_K"):
        return random_blocks(block, n, k, rng)
    return quantize(rng.standard_normal((n, k)).astype(np.float32), GGMLQuantizationType[block])


@pytest.mark.parametrize("block", TABLE_TYPES)
def test_table_rows_and_logits_equal_the_dequantized_table(block: str) -> None:
    rng = np.random.default_rng(0)
    raw = _raw(block, 96, 512, rng)
    want = torch.from_numpy(np.array(dequantize(raw, GGMLQuantizationType[block])))
    table = pack_table(raw, block)
    assert table is not None and table.num_rows == 96
    assert table.nbytes < want.numel() * 4 / 3  # at most 10 of 32 bits a weight (Q6_K: 10, Q8_0: 9)
    ids = torch.tensor([5, 0, 95, 5, 17])
    assert torch.equal(table.rows(ids), want[ids])
    x = torch.randn(3, 512)
    ref = (x.double() @ want.double().T).float()
    for int8, tol in ((False, 1e-5), (True, 2e-2)):  # int8: x rounded per 32 inputs, as llama.cpp does
        assert (table.linear(x, int8_activations=int8) - ref).abs().max() <= tol * ref.abs().max()
    for rows in (40, 130):  # prefill rows: the row kernels in chunks of 15, then one dequantized F.linear
        x = torch.randn(rows, 512)
        ref = (x.double() @ want.double().T).float()
        assert (table.linear(x) - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_other_block_types_are_not_packed() -> None:
    rng = np.random.default_rng(1)
    assert pack_table(random_blocks("Q5_K", 8, 256, rng), "Q5_K") is None
    assert pack_table(rng.standard_normal((8, 256)).astype(np.float16), "F16") is None


def _scores(path: Path, cache: Path, **kwargs: object) -> tuple[LLM, torch.Tensor]:
    llm = LLM(str(path), gguf_cache_dir=str(cache), **kwargs)
    return llm, llm.score(PROMPT)


@pytest.mark.parametrize("tables", [{"token_embd": "Q6_K"}, {"token_embd": "Q4_K", "output": "Q6_K"}],
                         ids=["tied-q6_k", "untied-q4_k-q6_k"])
def test_a_packed_embedding_and_head_score_as_the_dequantized_tables(tables: dict[str, str], tmp_path: Path) -> None:
    types = {k: v for k, v in MIXED.items() if k != "output"} | tables
    path = write_tiny_llama(tmp_path / "tiny.gguf", types)
    packed, got = _scores(path, tmp_path / "cache", quantization="gguf", cpu_activations="float")
    model = packed.engine.loaded.model
    embed, head = model.model.embed_tokens, model.lm_head
    assert isinstance(embed, PackedEmbedding) and isinstance(head, PackedTableHead) and model.cpu_lm_head is head
    assert embed.table.block_type == tables["token_embd"] and head.table.block_type == tables.get("output", "Q6_K")
    assert (embed.table is head.table) == ("output" not in tables)  # tied: one table for both ends
    assert not [n for n in dict(model.named_parameters()) if "embed" in n or "lm_head" in n]  # no float table
    del packed, model, embed, head
    _, want = _scores(path, tmp_path / "cache")  # quantization null: dequantized fp32 tables
    assert (got - want).abs().max() < 1e-4


def test_int8_activations_reach_the_packed_head_and_f16_tables_stay_float(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "tiny.gguf", {**MIXED, "token_embd": "Q6_K"} | {"output": "Q6_K"})
    llm = LLM(str(path), gguf_cache_dir=str(tmp_path / "cache"), quantization="gguf", cpu_activations="int8")
    assert llm.engine.loaded.model.cpu_lm_head.int8_activations
    del llm
    f16 = write_tiny_llama(tmp_path / "f16.gguf", {k: v for k, v in MIXED.items() if k != "output"})
    model = LLM(str(f16), gguf_cache_dir=str(tmp_path / "cache"), quantization="gguf").engine.loaded.model
    assert type(model.model.embed_tokens) is VocabParallelEmbedding and not isinstance(model.lm_head, PackedTableHead)

"""A GGUF Q4_K_M-style file kept packed under tensor parallelism 2 (gloo, CPU) equals one process.

The tiny Llama of tests/gguf_kquant_files.py (q/k Q4_K and v Q6_K in one qkv, ffn_down Q6_K in
layer 0) is read with `quantization: gguf`: column-parallel layers slice the per-row block types with
their rows, row-parallel o_proj / down_proj take whole 32-input sub-blocks per rank (128 and 256
inputs). Greedy tokens must be identical and logprobs within 1e-4 of the single-process run.
"""

from __future__ import annotations

from dataclasses import replace

from gguf_kquant_files import MIXED, VOCAB, write_tiny_llama
from parallel_helpers import assert_same_outputs, engine_config, generate, make_prompts, single_process


def test_kquant_gguf_tp2_equals_single_process(tmp_path) -> None:
    path = write_tiny_llama(tmp_path / "tiny-q4_k_m.gguf", MIXED)
    config = engine_config(path, tp=2)
    config = replace(config, model=replace(config.model, quantization="gguf", gguf_cache_dir=str(tmp_path / "c")))
    prompts = make_prompts(VOCAB)
    assert_same_outputs(generate(single_process(config), prompts), generate(config, prompts))

"""Pipeline parallelism (alone and with TP) through the multi-process executor equals one process.

PP 2 with a configured uneven split (1 + 3 layers) on the tied-embedding Llama: the last stage
holds the LM head without the embedding, so the tied weight is loaded into it from
`model.embed_tokens.weight`. TP 2 x PP 2 (4 ranks) on Qwen3 with the even split.
"""

from __future__ import annotations

from parallel_helpers import (
    assert_same_outputs,
    engine_config,
    generate,
    make_prompts,
    single_process,
    write_checkpoint,
)


def test_pp2_uneven_partition_tied_head(tmp_path) -> None:
    folder = write_checkpoint("llama", tmp_path / "llama")
    config = engine_config(folder, pp=2, pipeline_layer_partition=(1, 3))
    prompts = make_prompts(250)
    assert_same_outputs(generate(single_process(config), prompts), generate(config, prompts))


def test_tp2_pp2_equals_single_process(tmp_path) -> None:
    folder = write_checkpoint("qwen3", tmp_path / "qwen3")
    config = engine_config(folder, tp=2, pp=2)
    prompts = make_prompts(256)
    assert_same_outputs(generate(single_process(config), prompts), generate(config, prompts))

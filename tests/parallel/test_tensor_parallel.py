"""TP = 2 through the multi-process executor equals the single-process engine.

Each model is written as a real safetensors folder; every rank loads only its slices. Greedy
tokens must be identical and the top-20 logprobs of every prompt and sampled position (log-
softmax of the logits) within 1e-4 in fp32. The Llama shape has 1 KV head (replicated on both
ranks), a vocab of 250 (padded to 256 and split 128 / 122 real rows) and a tied LM head.
"""

from __future__ import annotations

import pytest
from parallel_helpers import (
    assert_same_outputs,
    engine_config,
    generate,
    make_prompts,
    single_process,
    write_checkpoint,
)


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_tp2_equals_single_process(name: str, tmp_path) -> None:
    folder = write_checkpoint(name, tmp_path / name)
    config = engine_config(folder, tp=2)
    prompts = make_prompts(250)
    want = generate(single_process(config), prompts)
    got = generate(config, prompts)
    assert_same_outputs(want, got)

"""`cpu_activations: auto`, the default, on the embedded SmolLM2 (CPU): resolved where the kernels run.

`LLM("default", quantization="gguf")` keeps the Q4_1 projections packed on the CPU kernels: `auto`
must resolve to int8 there (every kernel runtime and the Q8_0 LM head switched, the resolved value in
the engine's config and stats) and give explicit `int8`'s greedy tokens. The float-weight model
(quantization null: the GGUF dequantized) resolves to float, its lossless Q8_0 LM head included. A
self-draft over the target's own layers follows the target: int8 under auto; with explicit `float`
both stay float (the draft never switches the shared layers), and on a GPU device the same packed
model resolves `auto` to float while `int8` is refused naming the field.
"""

from __future__ import annotations

import pytest
import torch
from shardserve.workers.llm import LLM
from shardserve.workers.quant.cpu_kernels.runtime import kernel_runtimes
from shardserve.workers.request import SamplingParams
from shardserve.workers.runner.cpu_activations import apply_cpu_activations

pytestmark = pytest.mark.slow
PROMPTS = ["Paris is", "The moon is", "Python is"]
PARAMS = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
SELF_DRAFT = {"method": "draft", "draft_model": "default", "draft_quantization": "gguf", "draft_num_layers": 20,
              "num_speculative_tokens": 2}


def _flags(llm: LLM) -> set[bool]:
    """int8_activations of every kernel layer and of the CPU LM head."""
    model = llm.engine.loaded.model
    assert model.cpu_lm_head is not None
    return {r.int8_activations for r in kernel_runtimes(model)} | {model.cpu_lm_head.int8_activations}


def _resolved(llm: LLM) -> str:
    value = llm.engine.config.model.cpu_activations
    assert llm.engine.stats().cpu_activations == value
    return value


def _greedy(llm: LLM) -> list[tuple[int, ...]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS)]


def test_auto_is_int8_on_the_packed_gguf_with_explicit_int8s_tokens() -> None:
    auto = LLM("default", quantization="gguf")
    assert len(kernel_runtimes(auto.engine.loaded.model)) == 4 * 30
    assert _resolved(auto) == "int8" and _flags(auto) == {True}
    got = _greedy(auto)
    del auto
    explicit = LLM("default", quantization="gguf", cpu_activations="int8")
    assert _resolved(explicit) == "int8" and _greedy(explicit) == got


def test_auto_is_float_on_float_weights_even_with_the_q8_0_head() -> None:
    llm = LLM("default")  # the GGUF dequantized: no kernel layer; its LM head is the exact Q8_0 copy
    assert kernel_runtimes(llm.engine.loaded.model) == []
    assert _resolved(llm) == "float" and _flags(llm) == {False}


@pytest.mark.parametrize("target, resolved", [("auto", "int8"), ("float", "float")])
def test_a_self_draft_follows_the_targets_resolved_value(target: str, resolved: str) -> None:
    llm = LLM("default", quantization="gguf", cpu_activations=target, speculative=SELF_DRAFT)
    proposer = llm.engine.speculator.proposer
    assert proposer.shares_target_weights
    assert _resolved(llm) == resolved and proposer.engine.config.model.cpu_activations == resolved
    assert _flags(llm) == {resolved == "int8"}  # the shared layers: a float target's stay float
    assert len(llm.generate(PROMPTS[:1], PARAMS)[0].outputs[0].token_ids) == PARAMS.max_tokens
    if target == "float":  # the rule on a GPU device (it only reads the device's type): auto is float, int8 refused
        model, gpu = llm.engine.loaded.model, torch.device("cuda")
        assert apply_cpu_activations(model, "auto", gpu) == "float" and _flags(llm) == {False}
        with pytest.raises(ValueError, match=r"model\.cpu_activations=int8 .* runs on cuda"):
            apply_cpu_activations(model, "int8", gpu)

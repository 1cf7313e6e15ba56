"""The one-call C++ decoder stack (workers/quant/cpu_kernels/decode_stack.py) on the embedded SmolLM2 GGUF.

Its reference is the module-by-module CPU path (the fused ops and packed kernels, one Python call per
op; itself checked against torch in test_cpu_decode_ops.py / test_cpu_kernels.py and against the
eager path in test_cpu_fast_path_greedy.py): the same model, with `decode_stack.set_enabled(False)`.
The hidden states each step hands to the LM head must be bit-identical, for float and (switched on the
same model, as `cpu_activations: int8` does at load) int8 activations, and the stack must really have
run the decode steps. A model whose attention backend is
not the CPU one gets no stack.
"""

from __future__ import annotations

import pytest
import torch
from shardserve.workers.attention.backend import get_attention_backend
from shardserve.workers.llm import LLM
from shardserve.workers.quant.cpu_kernels import decode_ops, decode_stack
from shardserve.workers.request import SamplingParams

PROMPTS = ["Paris is", "The moon is", "Python is"]


class CountingStack:
    """Stands in for the C++ DecodeStack object: counts the steps it runs, then runs them."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, 0

    def forward(self, *args):
        self.calls += 1
        return self.inner.forward(*args)


def _run(llm: LLM, stack: bool) -> tuple[list[list[int]], list[torch.Tensor], int]:
    """(greedy tokens, hidden states at each compute_logits, steps the C++ stack ran)."""
    model = llm.engine.loaded.model
    cpu_stack = model.model.cpu_stack
    hidden: list[torch.Tensor] = []
    head = model.compute_logits

    def record(h: torch.Tensor) -> torch.Tensor:
        hidden.append(h.clone())
        return head(h)

    inner, counting = cpu_stack.stack, CountingStack(cpu_stack.stack)
    cpu_stack.stack, model.compute_logits = counting, record
    decode_stack.set_enabled(stack)
    try:
        out = llm.generate(PROMPTS, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    finally:
        decode_stack.set_enabled(True)
        del model.compute_logits
        cpu_stack.stack = inner
    return [list(o.outputs[0].token_ids) for o in out], hidden, counting.calls


def _check(llm: LLM) -> None:
    llm.generate(PROMPTS[:1], SamplingParams(max_tokens=2, temperature=0))  # builds the stack
    stack = llm.engine.loaded.model.model.cpu_stack
    assert isinstance(stack, decode_stack.CpuDecodeStack) and stack.stack.num_layers() == 30
    got, got_hidden, calls = _run(llm, stack=True)
    want, want_hidden, none = _run(llm, stack=False)
    assert calls >= 5 and none == 0  # 6 tokens: at least the 5 decode steps went through the stack
    assert got == want
    assert len(got_hidden) == len(want_hidden)
    assert all(torch.equal(a, b) for a, b in zip(got_hidden, want_hidden, strict=True))


@pytest.mark.slow
def test_stack_is_bit_identical_to_the_module_path() -> None:
    from shardserve.workers.quant.cpu_kernels.runtime import use_int8_activations

    if decode_ops.ops() is None:
        pytest.skip("the CPU decode ops extension did not build here")
    llm = LLM("default", quantization="gguf", cpu_activations="float")  # auto would start at int8
    _check(llm)  # float activations
    model = llm.engine.loaded.model
    assert use_int8_activations(model) == 4 * 30  # as cpu_activations=int8 does at load; the stack follows
    _check(llm)
    model.set_attention_backend(get_attention_backend("torch"))  # not the CPU backend: no stack
    assert len(llm.generate(PROMPTS[:1], SamplingParams(max_tokens=3))[0].outputs[0].token_ids) == 3
    assert model.model.cpu_stack is None

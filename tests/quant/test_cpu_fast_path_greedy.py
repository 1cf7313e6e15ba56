"""The CPU fast path of the embedded SmolLM2 GGUF gives the same greedy tokens as the eager path.

`LLM("default", quantization="gguf")` with the fused CPU decode ops (decode_ops.cpp: RMSNorm,
rope + KV write, paged attention, SiLU-and-mul; the `cpu` attention backend), against the same model
loaded and run with `set_fused_kernels(False)` (the eager torch ops: the path before them), on 10
prompts. Both hold the tied embedding / LM head in its Q8_0 blocks (`quantization: gguf` on CPU,
models/gguf_tables.py), whatever the switch. Requests run 5 at a
time so every step stays below the kernels' dense-fallback size (16 rows) and takes the row kernels.
"""

from __future__ import annotations

import pytest
from shardserve.workers.llm import LLM
from shardserve.workers.models.gguf_tables import PackedTableHead
from shardserve.workers.models.layers import set_fused_kernels
from shardserve.workers.quant.cpu_kernels import decode_ops
from shardserve.workers.request import SamplingParams

PROMPTS = [f"{topic} is" for topic in ("Paris", "The moon", "Python", "A cat", "Music", "Winter", "Bread",
                                         "The ocean", "Chess", "A river")]


def _greedy(llm: LLM) -> list[list[int]]:
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    out: list[list[int]] = []
    for i in range(0, len(PROMPTS), 5):
        out += [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS[i:i + 5], params)]
    return out


@pytest.mark.slow
def test_fused_cpu_path_gives_the_eager_paths_greedy_tokens() -> None:
    if decode_ops.ops() is None:
        pytest.skip("the CPU decode ops extension did not build here")
    fast = LLM("default", quantization="gguf", cpu_activations="float")  # the eager path's exact float matmuls
    model = fast.engine.loaded.model
    assert model.model.layers[0].self_attn.backend.name == "cpu" and model.cpu_lm_head is not None
    got = _greedy(fast)
    del fast, model

    set_fused_kernels(False)
    try:
        eager = LLM("default", quantization="gguf", cpu_activations="float")
        model = eager.engine.loaded.model
        assert model.model.layers[0].self_attn.backend.name == "torch"
        assert isinstance(model.cpu_lm_head, PackedTableHead)  # the Q8_0 table kept packed by quantization: gguf
        want = _greedy(eager)
    finally:
        set_fused_kernels(True)
    assert got == want


@pytest.mark.slow
def test_int8_activations_are_honoured_and_refused_where_nothing_takes_them() -> None:
    from shardserve.workers.quant.cpu_kernels.runtime import Q4Runtime

    llm = LLM("default", quantization="gguf", cpu_activations="int8")
    model = llm.engine.loaded.model
    runtimes = [m.quant_method.runtime for m in model.modules()
                if isinstance(getattr(getattr(m, "quant_method", None), "runtime", None), Q4Runtime)]
    assert len(runtimes) == 4 * 30 and all(r.int8_activations for r in runtimes)
    assert model.cpu_lm_head is not None and model.cpu_lm_head.int8_activations
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    assert len(llm.generate(PROMPTS[:2], params)[1].outputs[0].token_ids) == 6
    del llm, model
    with pytest.raises(ValueError, match="cpu_activations=int8"):
        LLM("dummy:smollm2-135m", cpu_activations="int8")  # float weights: no layer on the kernels

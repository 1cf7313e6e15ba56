"""Pre-quantized MoE checkpoints on CUDA: experts packed for the fused quantized MoE kernel (kernels/moe.py).

The CPU file's folders (test_moe_checkpoints.py: a tiny Qwen3-MoE rewritten per module in GPTQ / AWQ /
compressed-tensors layouts) loaded on one GPU in float32 (the kernel's IEEE tl.dot) must give the greedy
tokens of their dequantized float folder on the same GPU, prompt log-probs within TOLERANCE; the experts
must be held as the stacked plane / FP8 layout (no float stacks; act-order experts with their input
permutations). Dense projections stay float in these folders (each format's own ignore list): the dense CUDA
kernels take bf16 / fp16 only; float32 with quantized dense layers is refused at load (test_dense_float32_is_refused). Run on the GPU machine: `pytest -q tests/quant/test_moe_checkpoints_gpu.py`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from quant_folders import dequantize_folder, quantize_folder
from shardserve.workers.llm import LLM
from shardserve.workers.quant.expert_checkpoint import CheckpointExperts
from shardserve.workers.request import SamplingParams
from test_moe_checkpoints import FORMATS, PROMPT, _write, qwen3_moe

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
TOLERANCE = 2e-3  # fp32 activations, the same dequantized weights: summation order only


@pytest.fixture(scope="module")
def float_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write(qwen3_moe(), tmp_path_factory.mktemp("qwen3_moe"))


def _run(folder: Path):
    llm = LLM(str(folder), dtype="float32", device="cuda", num_blocks=32, block_size=16)
    try:
        out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
        return tuple(out.outputs[0].token_ids), llm.score(PROMPT).cpu(), llm.engine.loaded.model
    finally:
        llm.engine.shutdown()


def _experts_only(name: str) -> dict:
    """quantize_folder arguments that keep every dense projection float (attention, layer 1's MLP) and list
    them in the format's own ignore list: only the experts stay quantized."""
    dense = [r".*self_attn", r".*mlp\.(gate|up|down)_proj"]  # the experts' names hold "mlp.experts."
    if FORMATS[name]["method"] in ("int8", "fp8", "packed"):  # compressed-tensors: regexes matched from the start
        extra = {"ignore": ["lm_head", r"re:.*self_attn\..*", r"re:.*mlp\.(gate|up|down)_proj$"]}
    else:  # GPTQ / AWQ: transformers' should_convert_module (regex up to a module boundary)
        extra = {"modules_to_not_convert": dense}
    return {"keep_float": lambda module: ".experts." not in module, "config_extra": extra}


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_prequantized_experts_in_the_fused_kernel(float_folder, tmp_path, name):
    folder = quantize_folder(float_folder, tmp_path / name, **{"group_size": 32, **FORMATS[name]},
                             **_experts_only(name))
    tokens, scores, model = _run(folder)
    want_tokens, want_scores, _ = _run(dequantize_folder(folder, float_folder, tmp_path / "reference"))
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts.quant_method, CheckpointExperts) and experts.quant_method.packed is not None
    assert not [n for n, _ in experts.named_parameters()]
    diff = (scores - want_scores).abs().max().item()
    assert tokens == want_tokens and diff <= TOLERANCE, (tokens, want_tokens, diff)
    if name == "gptq_act_order":
        assert experts.quant_method.packed[0].perm is not None  # gate / up inputs gathered per expert


def test_dense_float32_is_refused(float_folder, tmp_path):
    """Quantized dense layers with float32 activations on CUDA: a clear error at load, naming dtype."""
    folder = quantize_folder(float_folder, tmp_path / "gptq", **{"group_size": 32, **FORMATS["gptq_g32"]})
    with pytest.raises(ValueError, match=r"dtype float32 .* bfloat16 or float16"):
        LLM(str(folder), dtype="float32", device="cuda", num_blocks=32, block_size=16)

"""Pre-quantized MoE checkpoints (GPTQ, AWQ, compressed-tensors) load with their experts kept quantized.

Folders: a tiny Qwen3-MoE (4 experts, top-2, hidden 64, experts' intermediate 64, a dense second layer)
rewritten per module by tests/quant_folders.py in the public layouts (`...experts.3.down_proj.qweight`,
`...weight_packed`, ...) with the layouts' own packers — the dense readers' packers, checked against
GPTQModel and compressed-tensors in tests/models/. The reference is the float folder of the same
folder's dequantized weights (`dequantize_folder`), run as float through the same engine:
  - every format: experts held as CheckpointExperts (no float parameter, no widened copy), greedy tokens
    equal and prompt log-probs within TOLERANCE of the reference (8-bit and FP8 compute exactly what
    was dequantized; 4-bit CPU kernels keep scales and minimums in fp16, cpu_kernels/packing.py);
  - Mixtral's w1 / w3 / w2 names; act-order GPTQ experts (down's order folded into w13's rows);
  - ignore lists: a Qwen2-MoE whose shared expert and router llm-compressor left float, experts left
    float whole, targets naming only the experts, a list that splits one layer's experts (refused), a
    quantized router (refused); each library's matching rules on names;
  - `shardserve quantize --method rtn` (calibrate.py + checkpoint.py) writes MoE experts per expert;
  - bad input: a missing expert tensor, a group that does not divide the experts' features per TP rank,
    act-order under MoE TP, `quantization:` contradicting the folder — each error names the tensor / both.
compressed-tensors itself also writes folders (`_compressed_tensors_folder`: the package's qparams, quantize
and pack for every module, experts included; its decompression is the reference): a second implementation of
the per-expert layout, not only our packers. EP 2 / TP 2 under gloo: tests/parallel/test_moe_quant_parallel.py.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from quant_folders import dequantize_folder, pack_quantized_config, quantize_folder
from safetensors.torch import load_file, save_file
from shardserve.parallel.quant import UnquantizedLinearMethod
from shardserve.workers.config import ModelConfig
from shardserve.workers.llm import LLM
from shardserve.workers.models.loader import load_model
from shardserve.workers.quant.cpu import CpuWidened
from shardserve.workers.quant.expert_checkpoint import CheckpointExperts, stack_rows
from shardserve.workers.quant.formats.gptq import GptqLayout
from shardserve.workers.quant.ignore import unquantized_matcher
from shardserve.workers.quant.weights import GroupedWeight
from shardserve.workers.request import SamplingParams
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

PROJ = re.compile(r"^(model\.layers\.\d+\.(?:self_attn|mlp(?:\.experts\.\d+)?)\.(?:q|k|v|o|gate|up|down)_proj)"
                  r"\.weight$")

COMMON = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              vocab_size=256, num_hidden_layers=2, tie_word_embeddings=False, bos_token_id=None,
              eos_token_id=None, pad_token_id=None)
FORMATS = {
    "gptq_g32": dict(method="gptq"),
    "gptq_asym_g64": dict(method="gptq", sym=False, group_size=64),
    "gptq_8bit_asym": dict(method="gptq", bits=8, sym=False),
    "gptq_act_order": dict(method="gptq", desc_act=True),
    "awq_g32": dict(method="awq", sym=False),
    "ct_int8_channel": dict(method="int8"),
    "ct_fp8_per_tensor": dict(method="fp8", strategy="tensor"),
    "ct_w4a16_asym_g32": dict(method="packed", bits=4, sym=False),
    "ct_w8a16_channel": dict(method="packed", bits=8, group_size=-1),
}
FOUR_BIT = {"gptq_g32", "gptq_asym_g64", "gptq_act_order", "awq_g32", "ct_w4a16_asym_g32"}
# Prompt log-probs, absolute. Measured (2-core CPU): 4-bit <= 3.0e-3 (fp16 scales / minimums of the CPU kernels;
# exact for symmetric GPTQ, whose minimum -8 s is exact in fp16), 8-bit and FP8 <= 1.5e-6; the same runs
# differ from the original float model by 0.29-0.37 (4-bit) and 0.02-0.12 (8-bit, FP8).
TOLERANCE = {name: 1e-2 if name in FOUR_BIT else 1e-4 for name in FORMATS}
PROMPT = [5, 9, 17, 3, 100, 42, 7, 250, 11]


def _write(config, folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(folder)
    return folder


def qwen3_moe() -> Qwen3MoeConfig:
    return Qwen3MoeConfig(**COMMON, head_dim=16, intermediate_size=128, moe_intermediate_size=64, num_experts=4,
                          num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1],
                          architectures=["Qwen3MoeForCausalLM"])


@pytest.fixture(scope="module")
def float_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write(qwen3_moe(), tmp_path_factory.mktemp("qwen3_moe"))


def _run(folder: Path, **overrides) -> tuple[tuple[int, ...], torch.Tensor, torch.nn.Module]:
    llm = LLM(str(folder), dtype="float32", device="cpu", num_blocks=32, block_size=4, **overrides)
    try:
        out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
        return tuple(out.outputs[0].token_ids), llm.score(PROMPT), llm.engine.loaded.model
    finally:
        llm.engine.shutdown()


def _assert_kept_quantized(experts: torch.nn.Module) -> None:
    method = experts.quant_method
    assert isinstance(method, CheckpointExperts)
    assert not [name for name, _ in experts.named_parameters()]  # neither float stacks nor checkpoint tensors
    runtimes = [*method.cpu.w13, *method.cpu.w2]
    assert len(runtimes) == 2 * experts.num_local_experts
    assert not [r for r in runtimes if isinstance(r, CpuWidened) and r.dense is not None]  # no widened copy


def _compare(folder: Path, reference: Path, tolerance: float, **overrides) -> torch.nn.Module:
    # float activations: the kept-quantized layers must equal the dequantized weights' float matmuls
    tokens, scores, model = _run(folder, **{"cpu_activations": "float", **overrides})
    want_tokens, want_scores, _ = _run(reference)
    diff = (scores - want_scores).abs().max().item()
    assert tokens == want_tokens and diff <= tolerance, (tokens, want_tokens, diff)
    return model


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_prequantized_experts_match_their_dequantized_weights(float_folder, tmp_path, name):
    kwargs = {"group_size": 32, **FORMATS[name]}
    folder = quantize_folder(float_folder, tmp_path / name, **kwargs)
    reference = dequantize_folder(folder, float_folder, tmp_path / "reference")
    model = _compare(folder, reference, TOLERANCE[name])
    _assert_kept_quantized(model.model.layers[0].mlp.experts)
    if name == "gptq_act_order":  # g_idx really permuted: down's order became w13's rows, gate / up's a gather
        g_idx = load_file(folder / "model.safetensors")["model.layers.0.mlp.experts.2.down_proj.g_idx"]
        assert not torch.equal(g_idx, torch.arange(64, dtype=torch.int32) // 32)
        method = model.model.layers[0].mlp.experts.quant_method
        assert all(r.perm is not None for r in method.cpu.w13) and all(r.perm is None for r in method.cpu.w2)


def test_gate_and_up_with_different_act_orders_are_refused():
    w = GroupedWeight(q=torch.zeros(16, 64, dtype=torch.uint8), scales=torch.ones(16, 2), mins=torch.zeros(16, 2),
                      group_size=32, perm=torch.arange(64))
    other = GroupedWeight(q=w.q, scales=w.scales, mins=w.mins, group_size=32, perm=torch.arange(64).flip(0))
    assert torch.equal(stack_rows(w, w, "e").perm, w.perm)
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.experts.5: gate_proj and up_proj have different "
                                         r"act-order g_idx"):
        stack_rows(w, other, "model.layers.0.mlp.experts.5")


def test_mixtral_expert_names(tmp_path):
    config = MixtralConfig(**COMMON, intermediate_size=64, num_local_experts=4, num_experts_per_tok=2,
                           sliding_window=None, architectures=["MixtralForCausalLM"])
    src = _write(config, tmp_path / "mixtral")
    folder = quantize_folder(src, tmp_path / "gptq", "gptq", group_size=32)
    assert "model.layers.1.block_sparse_moe.experts.3.w2.qzeros" in load_file(folder / "model.safetensors")
    model = _compare(folder, dequantize_folder(folder, src, tmp_path / "reference"), TOLERANCE["gptq_g32"])
    for layer in model.model.layers:
        _assert_kept_quantized(layer.mlp.experts)


def test_ignore_list_keeps_shared_expert_and_router_float(tmp_path):
    """llm-compressor's usual MoE recipe: ignore lm_head, the routers and the shared experts."""
    config = Qwen2MoeConfig(**COMMON, intermediate_size=128, moe_intermediate_size=64, num_experts=4,
                            num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1,
                            shared_expert_intermediate_size=96, architectures=["Qwen2MoeForCausalLM"])
    src = _write(config, tmp_path / "qwen2_moe")
    ignore = {"ignore": ["lm_head", "re:.*mlp.gate$", "re:.*mlp.shared_expert_gate$", "re:.*shared_expert\\..*"]}
    folder = quantize_folder(src, tmp_path / "ct", "packed", bits=4, group_size=32, sym=False,
                             keep_float=lambda module: ".shared_expert." in module, config_extra=ignore)
    assert "model.layers.0.mlp.shared_expert.down_proj.weight" in load_file(folder / "model.safetensors")
    model = _compare(folder, dequantize_folder(folder, src, tmp_path / "reference"),
                     TOLERANCE["ct_w4a16_asym_g32"])
    block = model.model.layers[0].mlp
    _assert_kept_quantized(block.experts)
    assert isinstance(block.shared_expert.down_proj.quant_method, UnquantizedLinearMethod)
    assert isinstance(block.shared_expert.gate_up_proj.quant_method, UnquantizedLinearMethod)
    assert not isinstance(model.model.layers[0].self_attn.qkv_proj.quant_method, UnquantizedLinearMethod)


def test_experts_ignored_whole_stay_float_and_split_lists_are_refused(float_folder, tmp_path):
    folder = quantize_folder(float_folder, tmp_path / "gptq", "gptq", keep_float=lambda m: ".experts." in m,
                             config_extra={"modules_to_not_convert": ["gate", ".*experts"]})
    model = _load(folder)
    assert model.model.layers[0].mlp.experts.quant_method is None  # float experts: plain stacks
    assert not isinstance(model.model.layers[0].self_attn.qkv_proj.quant_method, UnquantizedLinearMethod)
    entry = json.loads((folder / "config.json").read_text())
    entry["quantization_config"]["modules_to_not_convert"] = ["model.layers.0.mlp.experts.1"]
    (folder / "config.json").write_text(json.dumps(entry))
    with pytest.raises(ValueError, match=r"keeps \['model.layers.0.mlp.experts.1.gate_proj'.*quantize all of "
                                         r"them or none"):
        _load(folder)


def test_quantized_router_is_refused(float_folder, tmp_path):
    folder = quantize_folder(float_folder, tmp_path / "gptq", "gptq")
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.mlp.gate.qweight"] = torch.zeros(8, 4, dtype=torch.int32)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.gate.qweight' belongs to a quantized router"):
        _load(folder)


def _load(folder: Path, quantization: str | None = None) -> torch.nn.Module:
    config = ModelConfig(model=str(folder), dtype="float32", device="cpu", quantization=quantization)
    return load_model(config, torch.device("cpu"), torch.float32).model


def test_missing_expert_tensor_and_format_contradiction_are_named(float_folder, tmp_path):
    folder = quantize_folder(float_folder, tmp_path / "awq", "awq")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.0.mlp.experts.3.down_proj.qzeros"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"no tensor model.layers.0.mlp.experts.3.down_proj.qzeros"):
        _load(folder)
    with pytest.raises(ValueError, match=r"quantization: fp8 contradicts the checkpoint, which is awq"):
        _load(folder, "fp8")
    tensors["model.layers.0.mlp.experts.3.down_proj.qzeros"] = torch.zeros(1, 8, dtype=torch.int32)  # [G=2, 8]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.experts.3.down_proj.qzeros': narrow.*out of range"):
        _load(folder)


def test_tp_split_errors_name_the_down_projection():
    """Under MoE TP each rank reads whole groups of the experts' down_proj inputs, or the load is refused."""
    experts = CheckpointExperts(GptqLayout(4, 64), "model.layers.0.mlp.experts")
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.experts.<expert>.down_proj.scales: group_size 64 "
                                         r"does not divide the 32 intermediate features"):
        experts._check_tp(inter_per_rank=32, tp_size=2)
    experts._check_tp(inter_per_rank=64, tp_size=2)
    with pytest.raises(ValueError, match=r"down_proj.scales: act-order \(desc_act\) GPTQ experts need a MoE "
                                         r"tensor-parallel size of 1"):
        CheckpointExperts(GptqLayout(4, 32, desc_act=True), "model.layers.0.mlp.experts")._check_tp(64, 2)


def _compressed_tensors_folder(src: Path, dst: Path, scheme_name: str) -> tuple[Path, Path]:
    """(folder written by compressed-tensors' compressors, float folder of its own decompression)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme, preset_name_to_scheme
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    scheme, fmt = {
        "w4a16_asym_g32": (QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
            num_bits=4, type="int", strategy="group", group_size=32, symmetric=False)), "pack-quantized"),
        "w8a16_channel": (QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
            num_bits=8, type="int", strategy="channel", symmetric=True)), "pack-quantized"),
        "fp8_dynamic": (preset_name_to_scheme("FP8_DYNAMIC", ["Linear"]), "float-quantized"),
    }[scheme_name]
    compressor = BaseCompressor.get_value_from_registry(fmt)
    args = scheme.weights
    tensors = load_file(src / "model.safetensors")
    packed, reference = {}, {}
    for name, w in tensors.items():
        match = PROJ.match(name)
        if match is None:
            packed[name] = reference[name] = w
            continue
        if args.strategy == "channel":
            lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
        else:
            groups = w.reshape(w.shape[0], -1, args.group_size)
            lo, hi = groups.amin(dim=2), groups.amax(dim=2)
        scale, zero_point = calculate_qparams(lo, hi, args)
        module = {"weight": w, "weight_scale": scale, "weight_zero_point": zero_point}
        compressed = compressor.compress(module, scheme)
        packed.update({f"{match.group(1)}.{key}": t for key, t in compressed.items()})
        reference[name] = compressor.decompress(compressed, scheme)["weight"].float()
    config = json.loads((src / "config.json").read_text())
    entry = {"quant_method": "compressed-tensors", "format": fmt, "quantization_status": "compressed",
             "config_groups": {"group_0": {**scheme.model_dump(mode="json"), "format": fmt}},
             "ignore": ["lm_head", "re:.*mlp.gate$"]}
    folders = []
    for folder, state, quantized in ((dst / "ct", packed, True), (dst / "ct_reference", reference, False)):
        folder.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({**config, "quantization_config": entry} if quantized
                                                       else config))
        for extra in src.iterdir():
            if extra.suffix != ".safetensors" and extra.name != "config.json":
                shutil.copy(extra, folder / extra.name)
        folders.append(folder)
    return folders[0], folders[1]


@pytest.mark.parametrize("scheme", ["w4a16_asym_g32", "w8a16_channel", "fp8_dynamic"])
def test_folders_written_by_compressed_tensors(float_folder, tmp_path, scheme):
    folder, reference = _compressed_tensors_folder(float_folder, tmp_path, scheme)
    assert "model.layers.0.mlp.experts.3.down_proj.weight_scale" in load_file(folder / "model.safetensors")
    model = _compare(folder, reference, 1e-2 if scheme.startswith("w4") else 1e-4)
    _assert_kept_quantized(model.model.layers[0].mlp.experts)


def test_ignore_conventions_match_as_their_libraries_do():
    ct = unquantized_matcher({"ignore": ["lm_head", "re:.*mlp.gate$"], "config_groups": {"g": {"targets": ["Linear"]}}})
    assert ct("lm_head") and ct("model.layers.3.mlp.gate")
    assert not ct("model.layers.3.mlp.gate_proj") and not ct("model.layers.3.mlp.experts.0.gate_proj")
    awq = unquantized_matcher({"modules_to_not_convert": ["gate"]})  # transformers' should_convert_module
    assert awq("model.layers.0.mlp.gate") and not awq("model.layers.0.mlp.experts.0.gate_proj")
    targets = unquantized_matcher({"config_groups": {"g": {"targets": ["re:.*mlp.experts.*"]}}})
    assert targets("model.layers.0.self_attn.q_proj") and not targets("model.layers.0.mlp.experts.1.up_proj")
    gptq = unquantized_matcher({"dynamic": {"-:.*shared_expert.*": {}},
                                "modules_in_block_to_quantize": [["self_attn.q_proj"], ["mlp.experts.0.up_proj"]]})
    assert gptq("model.layers.1.mlp.shared_expert.up_proj") and gptq("model.layers.1.self_attn.k_proj")
    assert not gptq("model.layers.1.self_attn.q_proj") and not gptq("model.layers.1.mlp.experts.0.up_proj")
    assert unquantized_matcher({"quant_method": "gptq", "bits": 4}) is None
    with pytest.raises(ValueError, match=r"dynamic overrides \['\+:.*down_proj'\] are not supported"):
        unquantized_matcher({"dynamic": {"+:.*down_proj": {"bits": 8}}})


def test_targets_naming_only_the_experts_keep_attention_float(float_folder, tmp_path):
    config_groups = pack_quantized_config(4, 32, False)["config_groups"]
    config_groups["group_0"]["targets"] = ["re:.*mlp.experts.*"]
    folder = quantize_folder(float_folder, tmp_path / "ct", "packed", bits=4, group_size=32, sym=False,
                             keep_float=lambda m: ".experts." not in m, config_extra={"config_groups": config_groups})
    model = _load(folder)
    _assert_kept_quantized(model.model.layers[0].mlp.experts)
    for layer in model.model.layers:
        assert isinstance(layer.self_attn.qkv_proj.quant_method, UnquantizedLinearMethod)
    assert isinstance(model.model.layers[1].mlp.down_proj.quant_method, UnquantizedLinearMethod)


def test_quantize_command_writes_moe_experts_with_rtn(float_folder, tmp_path):
    """`shardserve quantize --method rtn` on a MoE model (its calibrate / write steps): per-expert GPTQ tensors
    that load kept quantized and give what the folder dequantizes to; GPTQ / AWQ are refused for experts."""
    from shardserve.workers.quant.calibrate import QuantSpec, quantize_model
    from shardserve.workers.quant.checkpoint import write_folder

    model = AutoModelForCausalLM.from_pretrained(str(float_folder), dtype=torch.float32).eval()
    calib = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="--method gptq does not quantize MoE experts yet: use --method rtn"):
        quantize_model(model, calib, QuantSpec("gptq", 4, 32), progress=False)
    spec = QuantSpec("rtn", 4, 32, sym=False)
    result = quantize_model(model, calib, spec, progress=False)
    folder = write_folder(tmp_path / "rtn", float_folder, model, result, spec)
    tensors = load_file(folder / "model.safetensors")
    assert "model.layers.0.mlp.experts.3.up_proj.qzeros" in tensors and "model.layers.0.mlp.gate.weight" in tensors
    assert not [name for name in tensors if name.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    model = _compare(folder, dequantize_folder(folder, float_folder, tmp_path / "reference"), TOLERANCE["gptq_g32"])
    _assert_kept_quantized(model.model.layers[0].mlp.experts)


def test_merged_dense_parts_with_different_act_order_are_refused(float_folder, tmp_path):
    """q/k/v share one g_idx parameter: a folder whose k_proj has another order than q_proj was read with
    the last part's order (wrong weights, silently); it is refused, naming the cause."""
    folder = quantize_folder(float_folder, tmp_path / "act_order", method="gptq", group_size=32, desc_act=True)
    tensors = load_file(folder / "model.safetensors")
    name = "model.layers.0.self_attn.k_proj.g_idx"
    tensors[name] = tensors[name].roll(1)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="different act-order g_idx"):
        _run(folder)

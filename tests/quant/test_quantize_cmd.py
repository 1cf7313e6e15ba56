"""`shardserve quantize` on the embedded SmolLM2 (256 calibration tokens; RTN and AWQ): the folder it writes has
the public GPTQ / AWQ tensor names, shapes and dtypes and the matching quantization_config, and
its packed tensors, unpacked by the loader's layouts, are exactly the model whose perplexity the
command printed. Bad flags are refused with the field named, before any model is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from shardserve.cluster.cli import main
from shardserve.cluster.commands.quantize import hf_folder, perplexity
from shardserve.workers.quant.calibrate import LINEARS, QuantSpec
from shardserve.workers.quant.formats.detect import quantization_config
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = pytest.mark.slow

DATA = Path(__file__).resolve().parents[2] / "benchmarks" / "data"


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory) -> Path:
    """The first ~300 tokens of eval.txt: enough for a perplexity, cheap on two cores."""
    path = tmp_path_factory.mktemp("eval") / "eval.txt"
    path.write_text((DATA / "eval.txt").read_text()[:1400])
    return path


def quantize(capsys, tmp_path: Path, eval_file: Path, *flags: str) -> tuple[Path, dict]:
    out = tmp_path / "out"
    code = main(["quantize", "--model", "default", "--calib", str(DATA / "calib.txt"), "--calib-tokens", "256",
                 "--eval", str(eval_file), "--out", str(out), "--json", *flags])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    return out, summary


def check_folder_is_what_was_measured(out: Path, spec: QuantSpec, summary: dict, eval_file: Path) -> None:
    """Dequantize every packed linear with the checkpoint layout, put the floats into the source
    model (with the folder's own float tensors, e.g. AWQ's folded norms): same perplexity as printed."""
    tensors = load_file(str(out / "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(str(hf_folder("default")), dtype=torch.float32).eval()
    layout = spec.layout
    state = {}
    for name in model.state_dict():
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and module.split(".", 3)[-1] in LINEARS:
            packed = {key: tensors[f"{module}.{key}"] for key in layout.tensors(1024, 1024)}
            state[name] = layout.unpack(packed).dequantize()
        elif name in tensors:
            state[name] = tensors[name]
    missing = set(model.state_dict()) - set(state) - {"lm_head.weight"}  # tied to the embeddings
    assert not missing, missing
    model.load_state_dict(state, strict=False)
    ids = AutoTokenizer.from_pretrained(str(out))(eval_file.read_text(), add_special_tokens=False)["input_ids"]
    assert len(ids) == summary["eval_tokens"]
    assert perplexity(model, ids) == pytest.approx(summary["quantized_perplexity"], abs=2e-3)


def test_gptq_layout_folder(capsys, tmp_path, eval_file):
    # RTN writes the same GPTQ layout as GPTQ (whose column loop is the slow part on two cores);
    # GPTQ itself, act-order g_idx included, is covered on small layers in test_algorithms.py.
    # --no-clip: the clipping search (tests/quant/test_clip.py) is not what this folder test is about.
    out, summary = quantize(capsys, tmp_path, eval_file, "--method", "rtn", "--bits", "4", "--group-size", "128",
                            "--no-clip")
    assert (summary["sym"], summary["desc_act"], summary["gptaq"]) == (False, False, False)  # rtn's defaults
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == quantization_config(4, 128, False, False, "gptq")
    assert config["model_type"] == "llama"
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    tensors = load_file(str(out / "model.safetensors"))
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * (hidden // config["num_attention_heads"])
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, kv),
              "self_attn.v_proj": (hidden, kv), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (hidden, inter), "mlp.up_proj": (hidden, inter), "mlp.down_proj": (inter, hidden)}
    for i in range(config["num_hidden_layers"]):
        for name, (k, n) in shapes.items():
            prefix = f"model.layers.{i}.{name}"
            groups = -(-k // 128)
            assert f"{prefix}.weight" not in tensors
            assert tensors[f"{prefix}.qweight"].shape == (k // 8, n) and tensors[f"{prefix}.qweight"].dtype == torch.int32
            assert tensors[f"{prefix}.qzeros"].shape == (groups, n // 8)
            assert tensors[f"{prefix}.qzeros"].dtype == torch.int32
            assert tensors[f"{prefix}.scales"].shape == (groups, n)
            assert tensors[f"{prefix}.scales"].dtype == torch.float16
            g_idx = tensors[f"{prefix}.g_idx"]
            assert g_idx.shape == (k,) and g_idx.dtype == torch.int32
            assert torch.equal(g_idx, torch.arange(k, dtype=torch.int32) // 128)
        assert tensors[f"model.layers.{i}.input_layernorm.weight"].dtype == torch.float32
    assert "model.embed_tokens.weight" in tensors and "lm_head.weight" not in tensors  # tied
    assert summary["quantized_perplexity"] > summary["float_perplexity"] > 1
    check_folder_is_what_was_measured(out, QuantSpec("rtn", 4, 128, False), summary, eval_file)


def test_awq_folder(capsys, tmp_path, eval_file):
    # --rounding rtn: GPTQ's column loop (awq's default rounding) is slow on two cores; the pipeline with GPTQ
    # rounding writes back what it packs in test_algorithms.py, and the layout is the same.
    out, summary = quantize(capsys, tmp_path, eval_file, "--method", "awq", "--group-size", "64", "--no-clip",
                            "--rounding", "rtn")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == quantization_config(4, 64, False, False, "awq")
    tensors = load_file(str(out / "model.safetensors"))
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    for prefix, k, n in (("model.layers.3.self_attn.q_proj", hidden, hidden),
                         ("model.layers.3.mlp.down_proj", inter, hidden)):
        assert tensors[f"{prefix}.qweight"].shape == (k, n // 8) and tensors[f"{prefix}.qweight"].dtype == torch.int32
        assert tensors[f"{prefix}.qzeros"].shape == (k // 64, n // 8)
        assert tensors[f"{prefix}.scales"].shape == (k // 64, n)
        assert tensors[f"{prefix}.scales"].dtype == torch.float16
        assert f"{prefix}.g_idx" not in tensors and f"{prefix}.weight" not in tensors
    source = load_file(str(hf_folder("default") / "model.safetensors"))
    name = "model.layers.3.post_attention_layernorm.weight"
    assert not torch.equal(tensors[name], source[name])  # 1/s folded into the norm
    check_folder_is_what_was_measured(out, QuantSpec("awq", 4, 64, False), summary, eval_file)


@pytest.mark.parametrize(("flags", "message"), [
    (["--method", "gptq", "--bits", "3"], "bits must be one of (4, 8) for gptq, got 3"),
    (["--method", "awq", "--bits", "8"], "bits must be one of (4,) for awq, got 8"),
    (["--method", "gptq", "--group-size", "100"], "group_size must be one of (-1, 32, 64, 128), got 100"),
    (["--method", "awq", "--rounding", "rtn", "--desc-act"], "desc_act (act-order) is a GPTQ option"),
    (["--method", "rtn", "--static-groups"], "static_groups is a GPTQ option; method is rtn"),
    (["--method", "gptq", "--damp", "1.5"], "damp must be in (0, 1), got 1.5"),
    (["--method", "awq", "--rounding", "rtn", "--gptaq"], "gptaq (asymmetric calibration) is a GPTQ option; method is awq"),
    (["--method", "awq", "--rounding", "rtn", "--gains"], "gains (input-channel gains) follow GPTQ rounding; method is awq"),
    (["--method", "rtn", "--awq-scales"], "awq_scales (AWQ's scale search before GPTQ) is a GPTQ option"),
    (["--method", "gptq", "--rounding", "rtn"], "rounding is an AWQ option (rtn or gptq); method is gptq"),
    (["--method", "awq", "--rounding", "gptq", "--no-static-groups"], "the AWQ layout has no g_idx"),
    (["--method", "rtn", "--calib-tokens", "1000"], "--calib-tokens must be 16..512 or a multiple of 512"),
])
def test_bad_flags_are_refused(capsys, tmp_path, flags, message):
    code = main(["quantize", "--calib", str(DATA / "calib.txt"), "--out", str(tmp_path / "o"), *flags])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("flags", "expected"), [
    (["--method", "gptq"], (False, True, False, True, True, False, False, "", 7168)),
    (["--method", "gptq", "--sym", "--no-desc-act", "--no-gptaq", "--no-awq-scales", "--calib-tokens", "512"],
     (True, False, False, False, False, False, False, "", 512)),
    (["--method", "awq"], (False, True, True, True, False, True, True, "gptq", 7168)),
    (["--method", "awq", "--rounding", "rtn"], (False, False, False, False, False, False, False, "rtn", 2048)),
    (["--method", "rtn"], (False, False, False, False, False, False, False, "", 2048)),
])
def test_defaults_are_the_best_measured(tmp_path, flags, expected):
    """GPTQ's defaults: AWQ's scales, asymmetric, act-order, GPTAQ, 7168 tokens; AWQ's: its scales rounded by GPTQ (act-order
    with static groups) + GPTAQ + refit + gains on 7168 tokens (benchmarks/README.md's quality row); each can be
    changed. The missing --calib stops the run before any model loads."""
    from shardserve.cluster.cli import build_parser
    from shardserve.cluster.commands.quantize import run

    args = build_parser("quantize").parse_args(
        ["quantize", "--calib", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o"), *flags])
    assert run(args) == 2
    assert (args.sym, args.desc_act, args.static_groups, args.gptaq, args.awq_scales, args.refit, args.gains,
            args.rounding, args.calib_tokens) == expected

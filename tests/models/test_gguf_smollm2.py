"""The embedded SmolLM2-135M-Instruct GGUF: our logits equal transformers' on the same file.

Both sides dequantize the Q4_1 file to float32 with transformers' GGUF utilities, so the
comparison checks our Llama implementation, tied embeddings, the q/k un-permutation and the
tokenizer + chat template that come from the file.
"""

from __future__ import annotations

import pytest
import torch
from paged_helper import PagedBatch

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea."]


@pytest.mark.slow
def test_default_model_metadata(smollm2_loaded) -> None:
    loaded = smollm2_loaded
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert loaded.model.kv_cache_spec.num_layers == 30 and loaded.model.kv_cache_spec.head_dim == 64
    assert loaded.model.kv_cache_spec.num_kv_heads == 3
    assert loaded.max_model_len == 8192
    assert loaded.tokenizer is not None and loaded.tokenizer.chat_template
    assert loaded.tokenizer.convert_tokens_to_ids("<|im_end|>") in loaded.eos_token_ids


@pytest.mark.slow
@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_and_greedy_tokens_equal_transformers(smollm2_loaded, hf_smollm2, prompt: str) -> None:
    tokenizer, model = smollm2_loaded.tokenizer, smollm2_loaded.model
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False)
    ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
    with torch.no_grad():
        expected_logits = hf_smollm2(torch.tensor([ids])).logits[0].float()
        expected = hf_smollm2.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                       max_new_tokens=5, do_sample=False)[0, len(ids):].tolist()
    batch = PagedBatch(model, num_blocks=16, block_size=16)
    (hidden,) = batch.step([("a", ids)])
    torch.testing.assert_close(model.compute_logits(hidden), expected_logits, atol=2e-4, rtol=0)
    produced: list[int] = []
    for _ in range(len(expected)):
        produced.append(int(model.compute_logits(hidden[-1:]).argmax(-1)))
        (hidden,) = batch.step([("a", produced[-1:])])
    assert produced == expected

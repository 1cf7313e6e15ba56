"""The Hugging Face `transformers` baseline, run in the same process as our engine.

The same checkpoint is loaded through transformers (GGUF, HF folder, or the same config with
random init for `dummy:` shapes — speed does not depend on the weights' values) and driven by
`generate` in padded static batches: left-padded prompts, greedy, every request in a batch
generating until the batch's longest output. Only each request's own output tokens count as
useful work, which is exactly what static batching wastes.
"""

from __future__ import annotations

import os
import time

import torch
from shardserve.workers.bench.workload import BenchRequest
from shardserve.workers.config import ModelConfig
from shardserve.workers.models.loader import LoadedModel, default_model_path


def load_hf_model(model_config: ModelConfig, loaded: LoadedModel, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    source = model_config.model
    if source == "default":
        folder, name = os.path.split(default_model_path())
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    elif source.endswith(".gguf"):
        folder, name = os.path.split(os.path.abspath(source))
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    elif source.startswith("dummy:"):
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(loaded.hf_config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    return model.to(device).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def hf_generate(model, requests: list[BenchRequest], batch_size: int, device: torch.device) -> tuple[float, int]:
    """Runs every request in padded static batches; returns (seconds, useful output tokens)."""
    _sync(device)
    start = time.perf_counter()
    useful = 0
    for i in range(0, len(requests), batch_size):
        batch = requests[i : i + batch_size]
        width = max(len(r.prompt_token_ids) for r in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, r in enumerate(batch):
            ids[row, width - len(r.prompt_token_ids) :] = torch.tensor(r.prompt_token_ids)
            mask[row, width - len(r.prompt_token_ids) :] = 1
        max_new = max(r.output_len for r in batch)
        model.generate(
            ids.to(device), attention_mask=mask.to(device), do_sample=False, max_new_tokens=max_new,
            min_new_tokens=max_new, pad_token_id=0, eos_token_id=None,
        )
        useful += sum(r.output_len for r in batch)
    _sync(device)
    return time.perf_counter() - start, useful

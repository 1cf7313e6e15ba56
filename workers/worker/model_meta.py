"""What a driver process needs to know about a model whose weights live in worker processes.

The engine process of a multi-process worker group tokenizes, validates and schedules, but
never builds the model: `load_model_metadata` resolves the same sources as models/loader.py
(Hugging Face folder, `.gguf` file, `dummy:<shape>`, `default`) and reads only the config and
the tokenizer, returning a `LoadedModel` whose `model` is None.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from shardserve.workers.config import ModelConfig
from shardserve.workers.models.dummy import dummy_config
from shardserve.workers.models.gguf import read_gguf_config
from shardserve.workers.models.loader import (
    DUMMY_PREFIX,
    LoadedModel,
    default_model_path,
    resolve_max_model_len,
)
from shardserve.workers.models.tokenizer import eos_token_ids, load_tokenizer
from transformers import AutoConfig


def load_model_metadata(model_config: ModelConfig, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """Config, tokenizer, EOS ids and length limit of `model_config.model`; no weights are read."""
    spec = model_config.model
    tokenizer: Any | None = None
    folder: Path | None = None
    if spec.startswith(DUMMY_PREFIX):
        config = dummy_config(spec[len(DUMMY_PREFIX):])
        name = spec
    else:
        path = default_model_path() if spec == "default" else Path(spec).expanduser()
        if path.suffix == ".gguf":
            if not path.is_file():
                raise FileNotFoundError(f"GGUF file {path} does not exist")
            config = read_gguf_config(path)
            tokenizer = load_tokenizer(path.parent, gguf_file=path.name)
        elif (path / "config.json").is_file():
            folder = path
            config = AutoConfig.from_pretrained(str(path))
            tokenizer = load_tokenizer(path)
        else:
            raise FileNotFoundError(f"model {spec!r} is not a folder with config.json, a .gguf file, "
                                    f"'{DUMMY_PREFIX}<shape>' or 'default'")
        name = "SmolLM2-135M-Instruct" if spec == "default" else path.stem if path.suffix else path.name
    return LoadedModel(
        model=None,
        hf_config=config,
        tokenizer=tokenizer,
        eos_token_ids=eos_token_ids(config, tokenizer, folder),
        max_model_len=resolve_max_model_len(config, model_config.max_model_len),
        name=name,
        device=device,
        dtype=dtype,
    )

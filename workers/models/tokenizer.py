"""Tokenizer and end-of-sequence ids of a checkpoint.

A Hugging Face folder's tokenizer loads with AutoTokenizer when its files are present; a GGUF
file carries its own vocabulary and chat template (`AutoTokenizer.from_pretrained(folder,
gguf_file=name)`). The end-of-sequence ids are the union of generation_config.json's, the
model config's and the tokenizer's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_tokenizer(folder: Path, gguf_file: str | None = None) -> Any | None:
    """AutoTokenizer for the folder (or GGUF file in it); None when the folder has no tokenizer."""
    if gguf_file is not None:
        return AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file)
    if not any((folder / name).exists() for name in TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(str(folder))


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def eos_token_ids(config: Any, tokenizer: Any | None, folder: Path | None = None) -> tuple[int, ...]:
    ids: list[int] = []
    if folder is not None and (folder / "generation_config.json").exists():
        ids += _as_ids(json.loads((folder / "generation_config.json").read_text()).get("eos_token_id"))
    ids += _as_ids(getattr(config, "eos_token_id", None))
    if tokenizer is not None:
        ids += _as_ids(getattr(tokenizer, "eos_token_id", None))
    return tuple(dict.fromkeys(ids))

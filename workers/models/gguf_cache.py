"""A converted copy of a GGUF checkpoint, so every start after the first is fast.

Reading a GGUF file through transformers is slow (metadata parsing, name mapping, the
tokenizer built from the vocabulary: tens of seconds for the 135M default model on a laptop
CPU), while the same weights load from safetensors in well under a second. The first load of a GGUF file
therefore writes a Hugging Face folder — config.json, model.safetensors (dequantized, float32
so no precision is lost), tokenizer files with the chat template — under
`ModelConfig.gguf_cache_dir` (workers/env_overrides.py resolves the default), keyed by the file's path, size and
mtime; later loads read that folder. The folder appears atomically (written to a temporary
name, then renamed), so a crash mid-write never leaves a half cache behind.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from shardserve.workers.env_overrides import gguf_cache_dir

CACHE_VERSION = 1
COMPLETE_MARKER = "shardserve-cache.json"


def cache_folder(gguf_path: Path, cache_dir: str | None = None) -> Path:
    stat = gguf_path.stat()
    key = f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{CACHE_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return gguf_cache_dir(cache_dir) / "gguf" / f"{gguf_path.stem}-{digest}"


def cached_folder(gguf_path: Path, cache_dir: str | None = None) -> Path | None:
    """The converted folder of this GGUF file, if a complete one exists."""
    folder = cache_folder(gguf_path, cache_dir)
    return folder if (folder / COMPLETE_MARKER).is_file() else None


def write_cache(gguf_path: Path, config: Any, tensors: dict[str, torch.Tensor], tokenizer: Any | None,
                cache_dir: str | None = None) -> Path | None:
    """Writes the converted folder; returns it, or None when the cache is not writable."""
    folder = cache_folder(gguf_path, cache_dir)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
        config.save_pretrained(tmp)
        # safetensors refuses shared storage (tied weights): store contiguous copies.
        save_file({name: t.detach().to(torch.float32).contiguous().clone() for name, t in tensors.items()},
                  str(tmp / "model.safetensors"))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        (tmp / COMPLETE_MARKER).write_text(json.dumps({"source": str(gguf_path), "version": CACHE_VERSION}))
        try:
            tmp.rename(folder)
        except OSError:  # another process won the race: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
        return folder
    except OSError:
        return None

"""A converted copy of a GGUF checkpoint, so every start after the first is fast.

Reading a GGUF file through transformers costs ~20 s on a laptop CPU for the 135M default
model (metadata parsing, name mapping, the tokenizer built from the vocabulary), while the
same weights load from safetensors in well under a second. The first load of a GGUF file
therefore writes a Hugging Face folder — config.json, model.safetensors (dequantized, float32
so no precision is lost), tokenizer files with the chat template — under
`$SHARDSERVE_CACHE_DIR` (default `~/.cache/shardserve`), keyed by the file's path, size and
mtime; later loads read that folder. The folder appears atomically (written to a temporary
name, then renamed), so a crash mid-write never leaves a half cache behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

CACHE_VERSION = 1
COMPLETE_MARKER = "shardserve-cache.json"


def cache_root() -> Path:
    return Path(os.environ.get("SHARDSERVE_CACHE_DIR", Path.home() / ".cache" / "shardserve"))


def cache_folder(gguf_path: Path) -> Path:
    stat = gguf_path.stat()
    key = f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{CACHE_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{gguf_path.stem}-{digest}"


def cached_folder(gguf_path: Path) -> Path | None:
    """The converted folder of this GGUF file, if a complete one exists."""
    folder = cache_folder(gguf_path)
    return folder if (folder / COMPLETE_MARKER).is_file() else None


def write_cache(gguf_path: Path, config: Any, tensors: dict[str, torch.Tensor], tokenizer: Any | None) -> Path | None:
    """Writes the converted folder; returns it, or None when the cache is not writable."""
    folder = cache_folder(gguf_path)
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

"""Streams Hugging Face safetensors checkpoints as (name, lazy slice) pairs.

`iterate_safetensors(folder)` opens each file of the checkpoint (one `model.safetensors`, or the
shards listed in `model.safetensors.index.json`) with `safe_open` and yields every tensor name
with a `SafetensorsSlice`: a view that records `narrow` calls and reads only the selected rows
and columns from disk when `load()` is called. Weight loaders narrow to this rank's slice
before loading, so a tensor-parallel rank reads only its own part of each weight.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class SafetensorsSlice:
    """A lazily read region of one tensor of an open safetensors file."""

    def __init__(self, handle: Any, bounds: tuple[tuple[int, int], ...]) -> None:
        self._handle = handle  # safetensors PySafeSlice
        self._bounds = bounds  # (start, stop) per dim

    @classmethod
    def of(cls, handle: Any) -> SafetensorsSlice:
        return cls(handle, tuple((0, n) for n in handle.get_shape()))

    @property
    def shape(self) -> torch.Size:
        return torch.Size(stop - start for start, stop in self._bounds)

    def narrow(self, dim: int, start: int, length: int) -> SafetensorsSlice:
        dim = dim % len(self._bounds)
        begin, stop = self._bounds[dim]
        if start < 0 or length < 0 or begin + start + length > stop:
            raise IndexError(f"narrow({dim}, {start}, {length}) out of range for shape {tuple(self.shape)}")
        bounds = list(self._bounds)
        bounds[dim] = (begin + start, begin + start + length)
        return SafetensorsSlice(self._handle, tuple(bounds))

    def load(self) -> torch.Tensor:
        if not self._bounds:
            return self._handle[:]
        return self._handle[tuple(slice(a, b) for a, b in self._bounds)]


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, in a stable order."""
    index = folder / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    if (folder / SINGLE_FILE).exists():
        return [folder / SINGLE_FILE]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {folder} (expected {SINGLE_FILE} or {INDEX_FILE})")
    return files


def count_tensors(files: list[Path]) -> int:
    total = 0
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            total += len(list(f.keys()))
    return total


def iterate_safetensors(files: list[Path]) -> Iterator[tuple[str, SafetensorsSlice]]:
    """Yield (name, lazy slice) for every tensor; a slice is valid until the next file opens."""
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                yield name, SafetensorsSlice.of(f.get_slice(name))

"""The embedding and LM head of a GGUF file kept in their blocks on CPU (`quantization: gguf`).

`keep_tables_packed(model, path, device)` runs after the model is built and before its tensors are
read: where the file's token_embd / output are Q8_0, Q4_0, Q4_1, Q4_K or Q6_K (quant/formats/gguf_tables.py),
it replaces the float modules by
  - `PackedEmbedding`: a row gather that dequantizes only the looked-up rows (model dtype out);
  - `PackedTableHead`: the logits through the projections' CPU kernels (float32 out), also set as
    `model.cpu_lm_head` so `cpu_activations` reaches it (runner/cpu_activations.py);
and returns the GGUF names it took, which the reader then skips (no float table is ever built). A
tied model (no output.weight) gets both from one PackedTable. It applies on CPU, at tensor-parallel
size 1 (the table is not split by vocab), where the kernels build; elsewhere (CUDA included) the
tables stay dequantized at load and the model's own modules run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from shardserve.parallel.embedding import ParallelLMHead, VocabParallelEmbedding
from shardserve.workers.quant.cpu_kernels import CpuKernelsUnavailable, best_isa
from shardserve.workers.quant.formats.gguf_tables import PackedTable, pack_table
from torch import nn


class PackedEmbedding(nn.Module):
    """input_ids [T] -> [T, hidden] in `dtype`, from the rows of a PackedTable."""

    def __init__(self, table: PackedTable, dtype: torch.dtype) -> None:
        super().__init__()
        self.table, self.dtype = table, dtype
        self.num_embeddings = table.num_rows

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.table.rows(input_ids).to(self.dtype)


class PackedTableHead(nn.Module):
    """hidden [T, hidden] -> float32 logits [T, vocab] through the CPU kernels."""

    def __init__(self, table: PackedTable) -> None:
        super().__init__()
        self.table = table
        self.num_embeddings, self.tp_size = table.num_rows, 1
        self.int8_activations = False  # ModelConfig.cpu_activations (runner/cpu_activations.py)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.table.linear(hidden_states, int8_activations=self.int8_activations)


def keep_tables_packed(model: nn.Module, path: Path, device: torch.device) -> frozenset[str]:
    """Swap `model`'s embedding / LM head for packed ones where the file allows; the GGUF names taken."""
    from gguf import GGUFReader

    inner = getattr(model, "model", None)
    embed: Any = getattr(inner, "embed_tokens", None)
    head: Any = getattr(model, "lm_head", None)
    if device.type != "cpu" or not _plain(embed, VocabParallelEmbedding) or not _plain(head, ParallelLMHead):
        return frozenset()
    try:
        best_isa()  # builds the kernels once
    except CpuKernelsUnavailable:
        return frozenset()
    tensors = {t.name: t for t in GGUFReader(str(path)).tensors if t.name in ("token_embd.weight", "output.weight")}
    vocab = model.config.vocab_size
    tables: dict[str, PackedTable] = {}
    for name, tensor in tensors.items():
        raw = np.asarray(tensor.data)
        table = pack_table(raw, tensor.tensor_type.name) if raw.shape[0] == vocab else None
        if table is not None:
            tables[name] = table
    taken: set[str] = set()
    if embed is not None and "token_embd.weight" in tables:
        inner.embed_tokens = PackedEmbedding(tables["token_embd.weight"], embed.weight.dtype)
        taken.add("token_embd.weight")
    head_name = "output.weight" if "output.weight" in tensors else "token_embd.weight"  # none: tied
    if head is not None and head_name in tables:
        model.lm_head = model.cpu_lm_head = PackedTableHead(tables[head_name])
        taken.add(head_name)
    return frozenset(taken)


def _plain(module: Any, cls: type) -> bool:
    """None (another pipeline stage's) or an unsharded float module of `cls`."""
    return module is None or (isinstance(module, cls) and module.tp_size == 1)

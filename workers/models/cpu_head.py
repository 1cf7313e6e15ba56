"""The LM head on CPU from 8-bit blocks when the float weight is exactly such blocks (lossless).

The embedded SmolLM2 GGUF stores its tied embedding as Q8_0; read with `quantization: null` the loader
dequantizes it to a float32 table (`gguf` on CPU keeps it in its blocks instead: gguf_tables.py), and a batch-1 decode step then spends more time streaming that table through F.linear than
in all the decoder layers (benchmarks/README.md). `packed_lm_head` re-derives the Q8_0 blocks from
the float table (PackedQ8.from_exact_float: kept only if every value round-trips exactly) and the
returned callable computes the logits with the q8 kernel (float activations, so the result equals
F.linear up to summation order, reading a quarter of the bytes; int8 activations only where
ModelConfig.cpu_activations resolves to int8, runner/cpu_activations.py: never under `auto` for a model
whose decoder layers are float). It applies only on CPU, to a
float32, single-rank head (no vocab sharding): otherwise None and the model keeps `lm_head(hidden)`.
"""

from __future__ import annotations

import torch
from shardserve.parallel.embedding import ParallelLMHead
from shardserve.workers.quant.cpu_kernels import (
    DENSE_FROM_ROWS,
    CpuKernelsUnavailable,
    PackedQ8,
    best_isa,
    q8_linear,
)


class PackedLMHead:
    """Logits from the packed blocks for decode-size steps; from `DENSE_FROM_ROWS` rows on, the
    float head's own F.linear (its table stays in memory as the embedding), which is faster there."""

    def __init__(self, packed: PackedQ8, lm_head: ParallelLMHead) -> None:
        self.packed, self.lm_head = packed, lm_head
        self.int8_activations = False  # ModelConfig.cpu_activations

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # [num_tokens, hidden] -> [num_tokens, vocab_size] float32
        if hidden_states.shape[0] >= DENSE_FROM_ROWS or hidden_states.dtype != torch.float32:
            return self.lm_head(hidden_states)
        logits = q8_linear(hidden_states, self.packed, int8_activations=self.int8_activations)
        return logits[:, : self.lm_head.num_embeddings]


def packed_lm_head(lm_head: ParallelLMHead | None) -> PackedLMHead | None:
    if lm_head is None or lm_head.tp_size != 1:
        return None
    weight = lm_head.weight
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.dim() != 2:
        return None
    try:
        best_isa()  # builds the kernels once
    except CpuKernelsUnavailable:
        return None
    packed = PackedQ8.from_exact_float(weight.detach())
    return None if packed is None else PackedLMHead(packed, lm_head)

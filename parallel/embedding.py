"""Vocab-parallel token embedding and LM head.

The vocabulary is padded up to a multiple of `padding_multiple * tp_size` and split into equal
contiguous ranges, one per TP rank. The embedding looks up the ids that fall in this rank's
range (others give zeros) and one all-reduce assembles the full rows. The LM head multiplies
the final hidden states by this rank's rows, all-gathers the vocab shards, and drops the
padding, returning float32 logits `[num_tokens, vocab_size]`. With tied embeddings the LM head
reuses the embedding's weight parameter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from shardserve.parallel.comm import tensor_model_parallel_all_gather, tensor_model_parallel_all_reduce
from shardserve.parallel.quant import Loadable, materialize
from shardserve.parallel.state import get_parallel_state
from torch import nn

DEFAULT_VOCAB_PADDING = 64


def pad_vocab_size(vocab_size: int, multiple: int) -> int:
    return (vocab_size + multiple - 1) // multiple * multiple


class VocabParallelEmbedding(nn.Module):
    """Embedding table `[padded_vocab / tp_size, embedding_dim]` per rank; rows past the vocab are 0."""

    def __init__(self, num_embeddings: int, embedding_dim: int, params_dtype: torch.dtype | None = None,
                 padding_multiple: int = DEFAULT_VOCAB_PADDING) -> None:
        super().__init__()
        state = get_parallel_state()
        self.tp_rank, self.tp_size = state.tp_rank, state.tp_size
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.num_embeddings_padded = pad_vocab_size(num_embeddings, padding_multiple * self.tp_size)
        self.num_embeddings_per_partition = self.num_embeddings_padded // self.tp_size
        self.vocab_start = self.tp_rank * self.num_embeddings_per_partition
        self.vocab_end = self.vocab_start + self.num_embeddings_per_partition
        self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_partition, embedding_dim,
                                               dtype=params_dtype or torch.get_default_dtype()),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight: Loadable, shard_id: object = None) -> None:
        """Copy this rank's vocab rows; the padding rows are zeroed."""
        if loaded_weight.shape[0] != self.num_embeddings:
            raise ValueError(f"embedding checkpoint has {loaded_weight.shape[0]} rows, expected {self.num_embeddings}")
        num_rows = max(0, min(self.vocab_end, self.num_embeddings) - self.vocab_start)
        param.data.zero_()
        if num_rows:
            param.data[:num_rows].copy_(materialize(loaded_weight.narrow(0, self.vocab_start, num_rows)))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: [num_tokens] -> [num_tokens, embedding_dim]
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        in_range = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local_ids = torch.where(in_range, input_ids - self.vocab_start, 0)
        out = F.embedding(local_ids, self.weight) * in_range.unsqueeze(-1).to(self.weight.dtype)
        return tensor_model_parallel_all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection over the vocab-parallel table; `forward` gives logits in the weight's dtype.

    Not widened to float32 here: every consumer that needs float32 widens what it uses (the
    sampler's working copy, log_softmax in logprobs.py), and a greedy batch takes argmax of the
    bf16 logits as they are (the same index: widening is exact). At 512 rows of a 128K vocabulary
    a float32 copy here would move ~0.4 GB a step on the last pipeline stage."""

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        """Share the embedding's weight (tie_word_embeddings)."""
        if embedding.num_embeddings_padded != self.num_embeddings_padded:
            raise ValueError("tied LM head and embedding must have the same padded vocab size")
        self.weight = embedding.weight

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # hidden_states: [num_tokens, hidden] -> [num_tokens, vocab_size] in the weight's dtype
        logits = F.linear(hidden_states, self.weight)  # [num_tokens, padded_vocab / tp_size]
        logits = tensor_model_parallel_all_gather(logits, dim=-1)  # [num_tokens, padded_vocab]
        return logits[:, : self.num_embeddings]

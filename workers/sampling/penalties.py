"""Logit processors that depend on what a request has already seen: penalties and min_tokens.

Data flow: the sampler hands a float32 logits copy [num_rows, vocab_size] and the batch's
`SamplingMetadata`; each function edits the logits in place, batched over all rows (rows whose
option is off get the neutral value: penalty 1, 0 and 0). Token histories arrive flat
(`TokenHistory`: ids plus their row); one scatter-add turns them into per-row counts over
vocab_size + 1 bins, the last bin catching ids outside the vocabulary and being dropped.
"""

from __future__ import annotations

import torch
from shardserve.workers.sampling.metadata import TokenHistory


def token_counts(history: TokenHistory, num_rows: int, vocab_size: int) -> torch.Tensor:
    """How often each vocabulary id occurs per row; ids outside [0, vocab_size) are ignored.

    Returns [num_rows, vocab_size] float32 (exact: counts stay far below 2**24).
    """
    ids = history.token_ids
    ids = ids.masked_fill((ids < 0) | (ids >= vocab_size), vocab_size)  # [total_tokens]
    flat_index = history.row_ids * (vocab_size + 1) + ids  # [total_tokens]
    counts = torch.zeros(num_rows * (vocab_size + 1), dtype=torch.float32, device=ids.device)
    counts.index_add_(0, flat_index, torch.ones(flat_index.shape, dtype=torch.float32, device=ids.device))
    return counts.view(num_rows, vocab_size + 1)[:, :vocab_size]


def apply_penalties(
    logits: torch.Tensor,
    prompt_tokens: TokenHistory | None,
    output_tokens: TokenHistory,
    repetition_penalties: torch.Tensor,
    presence_penalties: torch.Tensor,
    frequency_penalties: torch.Tensor,
) -> torch.Tensor:
    """Apply the repetition, presence and frequency penalties in place and return `logits`.

    logits: [num_rows, vocab_size] float32. prompt_tokens: None when no row has a repetition
    penalty. Penalties: [num_rows] float32.

    Repetition (CTRL / Hugging Face rule) covers prompt and output tokens: a seen token's logit
    is divided by the penalty when positive and multiplied by it when negative, so a penalty > 1
    always makes it less likely. Presence and frequency (OpenAI rule) cover output tokens only:
    logit -= presence * (count > 0) + frequency * count.
    """
    num_rows, vocab_size = logits.shape
    output_counts = token_counts(output_tokens, num_rows, vocab_size)  # [num_rows, vocab_size]
    output_seen = output_counts > 0

    if prompt_tokens is not None:
        seen = output_seen | (token_counts(prompt_tokens, num_rows, vocab_size) > 0)
        # Unseen tokens and rows with penalty 1 get factor 1: dividing or multiplying is a no-op.
        factor = torch.where(seen, repetition_penalties.unsqueeze(1), 1.0)  # [num_rows, vocab_size]
        logits.copy_(torch.where(logits > 0, logits / factor, logits * factor))

    logits -= frequency_penalties.unsqueeze(1) * output_counts
    logits -= presence_penalties.unsqueeze(1) * output_seen.to(logits.dtype)
    return logits


def apply_min_tokens_mask(logits: torch.Tensor, rows: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Set logits[rows[i], token_ids[i]] = -inf in place (EOS / stop ids before min_tokens).

    logits: [num_rows, vocab_size]; rows, token_ids: [num_masked] int64. Ids outside the
    vocabulary are skipped: the model cannot produce them, so there is nothing to mask.
    """
    vocab_size = logits.shape[1]
    in_vocab = token_ids < vocab_size
    # Adding -inf (or 0 for out-of-vocabulary ids, clamped onto a real column) instead of
    # boolean-indexing keeps this free of a device-to-host sync; accumulate makes duplicates safe.
    clamped = token_ids.clamp(max=vocab_size - 1)
    delta = torch.where(in_vocab, float("-inf"), 0.0).to(logits.dtype)  # [num_masked]
    logits.index_put_((rows, clamped), delta, accumulate=True)
    return logits

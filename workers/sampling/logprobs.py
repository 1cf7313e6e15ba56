"""Logprobs of chosen tokens and of the top-N alternatives, from raw model logits.

Data flow: the sampler (for sampled positions) or the runner (for prompt positions) passes
logits [num_rows, vocab_size] and one chosen token id per row. log_softmax runs on the raw
logits (vLLM's default "raw logprobs": before penalties, temperature and filtering), then the
chosen token's logprob and rank, and the top-N values with their ranks, are gathered on the
device in one batch. A single transfer to the host follows, and the rows become `TokenLogprobs`
dicts: the chosen token first, then the top-N in descending order. Rank = 1 + the number of
tokens with a strictly larger logprob (ties share a rank; 1 = most likely).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from shardserve.workers.request import Logprob
from shardserve.workers.step_types import TokenLogprobs

# Prompt positions are processed in chunks so the float32 log_softmax copy stays bounded
# (a 4k-token prompt over a 128k vocabulary would otherwise need 2 GiB at once).
PROMPT_LOGPROBS_CHUNK_SIZE = 512


@dataclass(frozen=True)
class GatheredLogprobs:
    """Device tensors of one batch of positions, before conversion to dicts.

    token_logprobs / token_ranks: [num_rows] the chosen token's logprob (float32) and rank (int64).
    top_logprobs / top_token_ids / top_ranks: [num_rows, num_top] the num_top most likely tokens.
    """

    token_logprobs: torch.Tensor
    token_ranks: torch.Tensor
    top_logprobs: torch.Tensor
    top_token_ids: torch.Tensor
    top_ranks: torch.Tensor


def gather_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: int) -> GatheredLogprobs:
    """Chosen-token logprob and rank plus the top `num_top`, batched over rows.

    logprobs: [num_rows, vocab_size] (already log_softmax-ed). token_ids: [num_rows] int64.
    """
    vocab_size = logprobs.shape[1]
    if not 0 <= num_top <= vocab_size:
        raise ValueError(f"num_top must be in [0, vocab_size={vocab_size}], got {num_top}")
    token_logprobs = logprobs.gather(1, token_ids.unsqueeze(1))  # [num_rows, 1]
    token_ranks = (logprobs > token_logprobs).sum(dim=1) + 1  # [num_rows]
    top_logprobs, top_token_ids = logprobs.topk(num_top, dim=1)  # [num_rows, num_top]
    # Every token strictly above a top-N value is itself in the top-N, so comparing inside the
    # top-N block gives the same rank as counting over the whole vocabulary.
    top_ranks = (top_logprobs.unsqueeze(1) > top_logprobs.unsqueeze(2)).sum(dim=2) + 1  # [num_rows, num_top]
    return GatheredLogprobs(
        token_logprobs=token_logprobs.squeeze(1),
        token_ranks=token_ranks,
        top_logprobs=top_logprobs,
        top_token_ids=top_token_ids,
        top_ranks=top_ranks,
    )


def to_token_logprobs(
    gathered: GatheredLogprobs, token_ids: torch.Tensor, num_top_per_row: Sequence[int]
) -> list[TokenLogprobs]:
    """One dict per row: chosen token first, then that row's own top-N (N <= num_top gathered)."""
    ids = token_ids.tolist()
    lps = gathered.token_logprobs.tolist()
    ranks = gathered.token_ranks.tolist()
    top_lps = gathered.top_logprobs.tolist()
    top_ids = gathered.top_token_ids.tolist()
    top_ranks = gathered.top_ranks.tolist()
    result: list[TokenLogprobs] = []
    for row, num_top in enumerate(num_top_per_row):
        entry: TokenLogprobs = {ids[row]: Logprob(lps[row], ranks[row])}
        for j in range(num_top):
            if top_ids[row][j] not in entry:
                entry[top_ids[row][j]] = Logprob(top_lps[row][j], top_ranks[row][j])
        result.append(entry)
    return result


def compute_token_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, num_top_per_row: Sequence[int]
) -> list[TokenLogprobs]:
    """Raw logits [num_rows, vocab_size] -> one TokenLogprobs per row (row i wants num_top_per_row[i])."""
    if logits.shape[0] != token_ids.shape[0] or logits.shape[0] != len(num_top_per_row):
        raise ValueError(
            f"logits rows ({logits.shape[0]}), token_ids ({token_ids.shape[0]}) and num_top_per_row "
            f"({len(num_top_per_row)}) must match"
        )
    if logits.shape[0] == 0:
        return []
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [num_rows, vocab_size]
    gathered = gather_logprobs(logprobs, token_ids, max(num_top_per_row))
    return to_token_logprobs(gathered, token_ids, num_top_per_row)


def compute_prompt_logprobs(
    logits: torch.Tensor, target_token_ids: torch.Tensor, top_n: int
) -> list[TokenLogprobs]:
    """Logprobs of a prompt chunk: entry j scores target_token_ids[j] (prompt token j + 1) given
    the prefix up to prompt token j, whose logits row is logits[j].

    logits: [num_positions, vocab_size] raw. target_token_ids: [num_positions] int64. top_n in
    [0, SamplingParams.MAX_LOGPROBS] by the request's validation, at most vocab_size here.
    """
    if logits.dim() != 2 or target_token_ids.shape != logits.shape[:1]:
        raise ValueError(
            f"logits must be [num_positions, vocab_size] and target_token_ids [num_positions], got "
            f"{tuple(logits.shape)} and {tuple(target_token_ids.shape)}"
        )
    result: list[TokenLogprobs] = []
    for start in range(0, logits.shape[0], PROMPT_LOGPROBS_CHUNK_SIZE):
        stop = start + PROMPT_LOGPROBS_CHUNK_SIZE
        chunk_targets = target_token_ids[start:stop].to(device=logits.device, dtype=torch.int64)
        result.extend(
            compute_token_logprobs(logits[start:stop], chunk_targets, [top_n] * chunk_targets.shape[0])
        )
    return result

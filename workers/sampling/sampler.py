"""Turns one step's logits into token ids (and logprobs), batched over rows with different options.

Data flow: the model runner passes logits [num_rows, vocab_size] of the requests that sample this
step and their `SamplingMetadata`. An all-greedy batch with no penalties or min_tokens is just
argmax of the logits as given (no copy). Otherwise the sampler works on a float32 copy, in vLLM's order:
min_tokens mask -> penalties -> (greedy rows: argmax here) -> temperature -> top-k -> top-p ->
min-p -> sample. Every stage is one batched tensor op over all rows; a row whose option is off
gets the neutral value, and a stage nobody uses is skipped. Sampling uses the exponential race:
argmax(probs / q) with q ~ Exp(1) per token is an exact draw from probs, and lets each seeded
row draw its own q from a generator seeded by (seed, number of outputs so far), so its tokens
do not depend on the rest of the batch; unseeded rows share the sampler's generator. Logprobs
come from log_softmax of the untouched input logits (see logprobs.py). The result is a
`SamplerOutput` the runner turns into `ModelRunnerOutput`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from shardserve.workers.sampling.logprobs import compute_token_logprobs
from shardserve.workers.sampling.metadata import SamplingMetadata
from shardserve.workers.sampling.penalties import apply_min_tokens_mask, apply_penalties
from shardserve.workers.step_types import TokenLogprobs

# Exp(1) draws can be exactly 0; clamping keeps probs / q finite-or-inf and never 0 / 0 = NaN.
_MIN_EXPONENTIAL = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class SamplerOutput:
    """token_ids: [num_rows] int64, the token chosen for each logits row.
    logprobs: per row, the sampled token's (logprob, rank) plus the top-N, or None for rows
    whose params.logprobs is None.
    """

    token_ids: torch.Tensor
    logprobs: list[TokenLogprobs | None]


def apply_top_k_only(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> torch.Tensor:
    """Keep each row's top_k largest logits (ties with the k-th kept), -inf the rest, in place.

    logits: [num_rows, vocab_size]; top_k: [num_rows] int64, 0 = off; max_top_k: the largest
    top_k in the batch (known on the host, so no device sync is needed to size topk).
    """
    vocab_size = logits.shape[1]
    k = torch.where((top_k <= 0) | (top_k > vocab_size), vocab_size, top_k)  # [num_rows]
    width = min(max(max_top_k, 1), vocab_size)
    top_values = logits.topk(width, dim=1).values  # [num_rows, width], descending
    kth = top_values.gather(1, (k.clamp(max=width) - 1).unsqueeze(1))  # [num_rows, 1]
    # Rows that keep everything (off, or k >= vocab) get a threshold of -inf.
    kth = kth.masked_fill((k >= vocab_size).unsqueeze(1), float("-inf"))
    return logits.masked_fill_(logits < kth, float("-inf"))


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Top-k then top-p (nucleus) over one ascending sort, in place; None skips a filter.

    logits: [num_rows, vocab_size]; top_k: [num_rows] int64, 0 = off; top_p: [num_rows] float32,
    1 = off. Top-p keeps the smallest set of most likely tokens whose mass (renormalised after
    top-k) reaches top_p: a token goes when the tokens above it already hold top_p.
    """
    vocab_size = logits.shape[1]
    sorted_logits, sorted_ids = logits.sort(dim=1, descending=False)  # [num_rows, vocab_size]
    if top_k is not None:
        k = torch.where((top_k <= 0) | (top_k > vocab_size), vocab_size, top_k)  # [num_rows]
        kth = sorted_logits.gather(1, (vocab_size - k).unsqueeze(1))  # [num_rows, 1]
        sorted_logits.masked_fill_(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        cumulative = sorted_logits.softmax(dim=1).cumsum(dim=1)  # [num_rows, vocab_size]
        drop = cumulative <= (1 - top_p).unsqueeze(1)
        drop[:, -1] = False  # the most likely token always stays
        sorted_logits.masked_fill_(drop, float("-inf"))
    return logits.scatter_(1, sorted_ids, sorted_logits)


def apply_top_k_top_p_candidates(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, max_top_k: int
) -> torch.Tensor:
    """Top-k then top-p when every row has top-k on: only the max_top_k largest logits per row
    can survive, so top-p works on those candidates instead of sorting the whole vocabulary.

    Same result as `apply_top_k_top_p` except that ties with a row's k-th logit are kept only
    inside the candidates. logits: [num_rows, vocab_size]; top_k: [num_rows] int64, all >= 1;
    top_p: [num_rows] float32; max_top_k < vocab_size.
    """
    values, ids = logits.topk(max_top_k, dim=1)  # [num_rows, max_top_k], descending
    kth = values.gather(1, (top_k.clamp(max=max_top_k) - 1).unsqueeze(1))  # [num_rows, 1]
    values.masked_fill_(values < kth, float("-inf"))
    probs = values.softmax(dim=1)  # [num_rows, max_top_k]
    mass_above = probs.cumsum(dim=1) - probs  # mass of the more likely candidates
    values.masked_fill_(mass_above >= top_p.unsqueeze(1), float("-inf"))  # position 0 always stays
    return logits.fill_(float("-inf")).scatter_(1, ids, values)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p * the row's top probability, in place.

    logits: [num_rows, vocab_size]; min_p: [num_rows] float32, 0 = off (nothing is below 0).
    """
    probs = logits.softmax(dim=1)  # [num_rows, vocab_size]
    threshold = probs.amax(dim=1, keepdim=True) * min_p.unsqueeze(1)  # [num_rows, 1]
    return logits.masked_fill_(probs < threshold, float("-inf"))


class Sampler:
    """Stateless per step apart from the generator shared by unseeded rows.

    vocab_size: width of the logits rows. seed: seeds the shared generator of unseeded rows
    (None = a nondeterministic seed); seeded requests never touch it.
    """

    def __init__(self, vocab_size: int, seed: int | None = None) -> None:
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.vocab_size = vocab_size
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        generator = self._generators.get(device)
        if generator is None:
            generator = torch.Generator(device=device)
            if self._seed is None:
                generator.seed()
            else:
                generator.manual_seed(self._seed)
            self._generators[device] = generator
        return generator

    def __call__(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        """logits: [num_rows, vocab_size] (any float dtype; not modified). Returns one token per row."""
        if logits.dim() != 2 or logits.shape[1] != self.vocab_size or logits.shape[0] != metadata.num_rows:
            raise ValueError(
                f"logits must be [num_rows={metadata.num_rows}, vocab_size={self.vocab_size}], "
                f"got {tuple(logits.shape)}"
            )
        if metadata.all_greedy and metadata.min_tokens_rows is None and metadata.no_penalties:
            # Nothing edits the logits: argmax them as they are. At 512 rows of a 128K vocabulary
            # the copy below would move ~0.5 GB per step, on a pipeline's busiest stage.
            token_ids = logits.argmax(dim=1)  # [num_rows]
            return SamplerOutput(token_ids=token_ids, logprobs=self._logprobs(logits, token_ids, metadata))
        processed = logits.to(torch.float32, copy=True)  # [num_rows, vocab_size]
        if metadata.min_tokens_rows is not None:
            apply_min_tokens_mask(processed, metadata.min_tokens_rows, metadata.min_tokens_token_ids)
        if not metadata.no_penalties:
            apply_penalties(
                processed,
                metadata.prompt_tokens,
                metadata.output_tokens,
                metadata.repetition_penalties,
                metadata.presence_penalties,
                metadata.frequency_penalties,
            )

        if metadata.all_greedy:
            token_ids = processed.argmax(dim=1)  # [num_rows]
        else:
            # Greedy = argmax after penalties; taken before _sample edits `processed` in place.
            greedy = None if metadata.all_random else processed.argmax(dim=1)  # [num_rows]
            sampled = self._sample(processed, metadata)  # [num_rows]
            token_ids = sampled if greedy is None else torch.where(metadata.greedy_mask, greedy, sampled)

        return SamplerOutput(token_ids=token_ids, logprobs=self._logprobs(logits, token_ids, metadata))

    def _sample(self, logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        """Temperature, filters, then one exponential-race draw per row. Edits `logits` in place."""
        logits.div_(metadata.temperatures.unsqueeze(1))
        top_k = None if metadata.no_top_k else metadata.top_k
        if not metadata.no_top_p and metadata.all_top_k and metadata.max_top_k < self.vocab_size:
            apply_top_k_top_p_candidates(logits, metadata.top_k, metadata.top_p, metadata.max_top_k)
        elif not metadata.no_top_p:
            apply_top_k_top_p(logits, top_k, metadata.top_p)
        elif top_k is not None:
            apply_top_k_only(logits, top_k, metadata.max_top_k)
        if not metadata.no_min_p:
            apply_min_p(logits, metadata.min_p)
        probs = logits.softmax(dim=1)  # [num_rows, vocab_size]

        q = torch.empty_like(probs)  # [num_rows, vocab_size]
        if len(metadata.seeded_rows) < metadata.num_rows:
            q.exponential_(generator=self._shared_generator(probs.device))
        # The only per-row loop: each seeded row draws its own q from (seed, position).
        for row, row_seed in zip(metadata.seeded_rows, metadata.seeded_step_seeds, strict=True):
            generator = torch.Generator(device=probs.device)
            generator.manual_seed(row_seed)
            q[row].exponential_(generator=generator)
        return probs.div_(q.clamp_(min=_MIN_EXPONENTIAL)).argmax(dim=1)

    def _logprobs(
        self, raw_logits: torch.Tensor, token_ids: torch.Tensor, metadata: SamplingMetadata
    ) -> list[TokenLogprobs | None]:
        result: list[TokenLogprobs | None] = [None] * metadata.num_rows
        rows = [i for i, n in enumerate(metadata.num_logprobs) if n is not None]
        if not rows:
            return result
        num_top = [metadata.num_logprobs[i] for i in rows]
        if len(rows) == metadata.num_rows:
            selected = compute_token_logprobs(raw_logits, token_ids, num_top)
        else:
            index = torch.tensor(rows, dtype=torch.int64, device=raw_logits.device)
            selected = compute_token_logprobs(raw_logits[index], token_ids[index], num_top)
        for row, entry in zip(rows, selected, strict=True):
            result[row] = entry
        return result

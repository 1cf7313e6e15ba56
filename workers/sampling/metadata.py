"""The batch description the sampler consumes: one row per request that samples this step.

Data flow: once per step the model runner asks its persistent batch's `SamplingState.build(rows)`
(workers/runner/sampling_state.py) for the rows that sample, in logits-row order. It turns the
per-request `SamplingParams` into batched tensors (temperature, top-k/p, min-p and the three
penalties travel as one packed host-to-device copy, cached while the batch does not change;
token-id histories for the penalties travel flat, as `TokenHistory`) plus the few per-row facts
that stay on the host (seeds of seeded rows, how many logprobs each row wants). Flags such as
`no_top_k` let the sampler skip whole stages when no row uses them. The frozen result goes to
`Sampler.__call__`; nothing in it is mutated afterwards.
"""
from __future__ import annotations

import array
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

_MASK_64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    # A bijective 64-bit mixer (Steele et al.): nearby inputs give unrelated outputs.
    x = (x + 0x9E3779B97F4A7C15) & _MASK_64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK_64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK_64
    return x ^ (x >> 31)


def step_seed(seed: int, num_output_tokens: int) -> int:
    """Seed of a seeded request's draw at one position: a function of (seed, position) only.

    Depending on nothing else is what makes a seeded request reproduce its tokens whatever it is
    batched with, and after a preemption that recomputes and re-samples it. Mixing (rather than
    seed + step) keeps (seed, step + 1) and (seed + 1, step) from sharing a stream. The result
    fits in 63 bits, which every torch.Generator accepts.
    """
    return _splitmix64(_splitmix64(seed & _MASK_64) ^ num_output_tokens) >> 1


@dataclass(frozen=True)
class TokenHistory:
    """Token ids of every row, concatenated: no padding, so nothing has to be masked out later.

    token_ids: [total_tokens] int64; row_ids: [total_tokens] int64, the row each id belongs to.
    """

    token_ids: torch.Tensor
    row_ids: torch.Tensor

    @classmethod
    def build(cls, rows: Sequence[Sequence[int]], device: torch.device | str) -> TokenHistory:
        # array('q') + frombuffer is several times faster than torch.tensor(list) or a copy per row.
        flat = array.array("q", itertools.chain.from_iterable(rows))
        token_ids = torch.frombuffer(flat, dtype=torch.int64) if flat else torch.empty(0, dtype=torch.int64)
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64)  # [num_rows]
        row_ids = torch.repeat_interleave(torch.arange(len(rows)), lengths)  # [total_tokens]
        # .to(device) copies (frombuffer shares `flat`'s memory); on CPU, clone to own it.
        return cls(token_ids=token_ids.to(device, copy=True), row_ids=row_ids.to(device))


@dataclass(frozen=True)
class SamplingMetadata:
    """Sampling options of one step's batch, row i = logits row i.

    temperatures: [num_rows] float32; greedy rows hold 1.0 so dividing by it is a no-op.
    greedy_mask: [num_rows] bool, rows with temperature 0 (argmax of the processed logits).
    top_k: [num_rows] int64, 0 = off; max_top_k: its largest value, on the host; all_top_k: every
      row has top-k on (then top-p only needs to look at max_top_k candidates).
    top_p: [num_rows] float32, 1 = off. min_p: [num_rows] float32, 0 = off.
    repetition_penalties / presence_penalties / frequency_penalties: [num_rows] float32 (1 / 0 / 0 = off).
    prompt_tokens: the prompts as a TokenHistory; only built when some row has a repetition
      penalty (the only penalty that looks at the prompt), else None.
    output_tokens: the outputs so far as a TokenHistory; None when no row has a penalty.
    min_tokens_rows / min_tokens_token_ids: [num_masked] int64 index pairs (row, token) set to
      -inf because the row has fewer than min_tokens outputs: EOS (unless ignore_eos) and its
      stop_token_ids. None when nothing is masked.
    seeded_rows / seeded_step_seeds: host tuples; row index and `step_seed(seed, num_outputs)` of
      each non-greedy seeded row.
    num_logprobs: host tuple, per row None (no logprobs) or N >= 0 (sampled token plus top-N).
    """

    temperatures: torch.Tensor
    greedy_mask: torch.Tensor
    all_greedy: bool
    all_random: bool
    top_k: torch.Tensor
    max_top_k: int
    no_top_k: bool
    all_top_k: bool
    top_p: torch.Tensor
    no_top_p: bool
    min_p: torch.Tensor
    no_min_p: bool
    repetition_penalties: torch.Tensor
    presence_penalties: torch.Tensor
    frequency_penalties: torch.Tensor
    no_penalties: bool
    prompt_tokens: TokenHistory | None
    output_tokens: TokenHistory | None
    min_tokens_rows: torch.Tensor | None
    min_tokens_token_ids: torch.Tensor | None
    seeded_rows: tuple[int, ...]
    seeded_step_seeds: tuple[int, ...]
    num_logprobs: tuple[int | None, ...]

    @property
    def num_rows(self) -> int:
        return len(self.num_logprobs)

    @property
    def max_num_logprobs(self) -> int | None:
        """Largest N any row asks for, or None when no row wants logprobs."""
        wanted = [n for n in self.num_logprobs if n is not None]
        return max(wanted) if wanted else None

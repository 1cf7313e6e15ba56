"""The batch description the sampler consumes: one row per request that samples this step.

Data flow: once per step the model runner calls `SamplingMetadata.build(params, prompt_token_ids,
output_token_ids, eos_token_id, device)` with the requests in logits-row order. `build` walks the
rows once on the host and turns per-request `SamplingParams` into batched tensors (temperature,
top-k/p, min-p and the three penalties travel as one packed host-to-device copy; token-id
histories for the penalties travel flat, as `TokenHistory`) plus the few per-row facts that stay
on the host (seeds of seeded rows, how many logprobs each row wants). Flags such as `no_top_k`
let the sampler skip whole stages when no row uses them. The frozen result goes to
`Sampler.__call__`; nothing in it is mutated afterwards.
"""

from __future__ import annotations

import array
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from shardserve.workers.request import SamplingParams

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

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        prompt_token_ids: Sequence[Sequence[int]],
        output_token_ids: Sequence[Sequence[int]],
        eos_token_id: int | None,
        device: torch.device | str,
    ) -> SamplingMetadata:
        """Batch the rows' options. All three sequences are in logits-row order."""
        num_rows = len(params)
        if len(prompt_token_ids) != num_rows or len(output_token_ids) != num_rows:
            raise ValueError(
                f"params, prompt_token_ids and output_token_ids must have one entry per row, got "
                f"{num_rows}, {len(prompt_token_ids)} and {len(output_token_ids)}"
            )
        if num_rows == 0:
            raise ValueError("SamplingMetadata needs at least one row, got 0")

        greedy = [p.temperature == 0 for p in params]
        needs_repetition = any(p.repetition_penalty != 1.0 for p in params)
        no_penalties = not needs_repetition and all(
            p.presence_penalty == 0 and p.frequency_penalty == 0 for p in params
        )

        mask_rows: list[int] = []
        mask_tokens: list[int] = []
        seeded_rows: list[int] = []
        seeded_step_seeds: list[int] = []
        for row, (p, out) in enumerate(zip(params, output_token_ids, strict=True)):
            if len(out) < p.min_tokens:
                banned = set(p.stop_token_ids)
                if eos_token_id is not None and not p.ignore_eos:
                    banned.add(eos_token_id)
                for token in sorted(banned):
                    mask_rows.append(row)
                    mask_tokens.append(token)
            if p.seed is not None and not greedy[row]:
                seeded_rows.append(row)
                seeded_step_seeds.append(step_seed(p.seed, len(out)))

        # One host-to-device copy for all per-row numbers: [7, num_rows] float32 (top_k < 2**24 is exact).
        packed = torch.tensor(
            [
                [float(p.temperature) for p in params],
                [float(p.top_k) for p in params],
                [float(p.top_p) for p in params],
                [float(p.min_p) for p in params],
                [float(p.repetition_penalty) for p in params],
                [float(p.presence_penalty) for p in params],
                [float(p.frequency_penalty) for p in params],
            ],
            dtype=torch.float32,
        ).to(device, non_blocking=True)
        raw_temperatures, top_k, top_p, min_p, repetition, presence, frequency = packed.unbind(0)
        greedy_mask = raw_temperatures == 0  # [num_rows]

        def longs(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64).to(device, non_blocking=True)

        return cls(
            temperatures=raw_temperatures.masked_fill(greedy_mask, 1.0),
            greedy_mask=greedy_mask,
            all_greedy=all(greedy),
            all_random=not any(greedy),
            top_k=top_k.to(torch.int64),
            max_top_k=max(p.top_k for p in params),
            no_top_k=all(p.top_k == 0 for p in params),
            all_top_k=all(p.top_k > 0 for p in params),
            top_p=top_p,
            no_top_p=all(p.top_p == 1.0 for p in params),
            min_p=min_p,
            no_min_p=all(p.min_p == 0.0 for p in params),
            repetition_penalties=repetition,
            presence_penalties=presence,
            frequency_penalties=frequency,
            no_penalties=no_penalties,
            prompt_tokens=TokenHistory.build(prompt_token_ids, device) if needs_repetition else None,
            output_tokens=None if no_penalties else TokenHistory.build(output_token_ids, device),
            min_tokens_rows=longs(mask_rows) if mask_rows else None,
            min_tokens_token_ids=longs(mask_tokens) if mask_rows else None,
            seeded_rows=tuple(seeded_rows),
            seeded_step_seeds=tuple(seeded_step_seeds),
            num_logprobs=tuple(p.logprobs for p in params),
        )

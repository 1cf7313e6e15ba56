"""A plain, one-pass SamplingMetadata builder: the reference the sampler tests batch rows with.

The engine builds SamplingMetadata incrementally from its persistent batch
(workers/runner/sampling_state.py `SamplingState.build`, cached per row); this builder walks
`SamplingParams` rows once, with no cache, so tests can state a batch directly and
tests/runner/test_sampling_state.py can check the incremental builder against it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from shardserve.workers.request import SamplingParams
from shardserve.workers.sampling.metadata import SamplingMetadata, TokenHistory, step_seed


def build_metadata(
    params: Sequence[SamplingParams],
    prompt_token_ids: Sequence[Sequence[int]],
    output_token_ids: Sequence[Sequence[int]],
    eos_token_id: int | None,
    device: torch.device | str,
) -> SamplingMetadata:
    """Batch the rows' options in one pass; all three sequences are in logits-row order."""
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

    return SamplingMetadata(
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

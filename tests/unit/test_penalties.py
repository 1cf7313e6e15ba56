"""Penalties and the min_tokens mask against a straightforward per-row reference (CPU only)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from sampling_reference import build_metadata
from shardserve.workers.request import SamplingParams
from shardserve.workers.sampling.metadata import TokenHistory
from shardserve.workers.sampling.penalties import apply_min_tokens_mask, apply_penalties, token_counts
from shardserve.workers.sampling.sampler import Sampler

VOCAB_SIZE = 16


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)  # test inputs built with torch.randn are the same on every run


def reference_penalties(row: torch.Tensor, prompt, output, repetition, presence, frequency) -> torch.Tensor:
    """One row, token by token: HF repetition rule over prompt + output, OpenAI rule over output."""
    out = row.clone()
    for token in set(prompt) | set(output):
        if 0 <= token < len(row):
            out[token] = out[token] / repetition if out[token] > 0 else out[token] * repetition
    for token, count in Counter(output).items():
        if 0 <= token < len(row):
            out[token] -= frequency * count + presence
    return out


def run_penalties(logits, params, prompts, outputs):
    metadata = build_metadata(params, prompts, outputs, None, "cpu")
    return apply_penalties(
        logits.clone(),
        metadata.prompt_tokens,
        metadata.output_tokens,
        metadata.repetition_penalties,
        metadata.presence_penalties,
        metadata.frequency_penalties,
    )


CASES = [
    # (params, prompt, output)
    (SamplingParams(repetition_penalty=1.3), [1, 2, 2, 5], [5, 7, 7, 7]),
    (SamplingParams(repetition_penalty=0.7), [0, 3], [15]),  # < 1 rewards repetition
    (SamplingParams(presence_penalty=1.5), [1, 2, 3], [4, 4, 9]),
    (SamplingParams(frequency_penalty=0.5), [4], [4, 4, 4, 6]),
    (SamplingParams(presence_penalty=-0.5, frequency_penalty=-1.0), [8], [8, 9, 9]),
    (
        SamplingParams(repetition_penalty=1.8, presence_penalty=0.4, frequency_penalty=0.3),
        [2, 3, 11],
        [3, 12, 12],
    ),
    (SamplingParams(), [1, 2, 3], [4, 5]),  # all off: row untouched
    (SamplingParams(repetition_penalty=2.0), [], []),  # nothing seen yet
]


def test_batched_penalties_match_per_row_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(len(CASES), VOCAB_SIZE, generator=g) * 2  # positive and negative logits
    params = [c[0] for c in CASES]
    got = run_penalties(logits, params, [c[1] for c in CASES], [c[2] for c in CASES])
    for row, (p, prompt, output) in enumerate(CASES):
        expected = reference_penalties(
            logits[row], prompt, output, p.repetition_penalty, p.presence_penalty, p.frequency_penalty
        )
        torch.testing.assert_close(got[row], expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(got[6], logits[6])


def test_presence_and_frequency_ignore_prompt_tokens():
    logits = torch.ones(1, VOCAB_SIZE)
    got = run_penalties(
        logits, [SamplingParams(presence_penalty=1.0, frequency_penalty=1.0)], [[3, 3]], [[5]]
    )
    assert got[0, 3] == 1.0 and got[0, 5] == pytest.approx(-1.0)


def test_repetition_divides_positive_and_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0] + [0.0] * (VOCAB_SIZE - 4)])
    got = run_penalties(logits, [SamplingParams(repetition_penalty=2.0)], [[0]], [[1]])
    assert got[0, :4].tolist() == [1.0, -4.0, 2.0, -2.0]


def test_token_counts_ignore_out_of_vocabulary_ids():
    rows = [[1, 1], [VOCAB_SIZE, VOCAB_SIZE + 3, 0, -1], [], [VOCAB_SIZE - 1]]
    counts = token_counts(TokenHistory.build(rows, "cpu"), len(rows), VOCAB_SIZE)
    expected = torch.zeros(len(rows), VOCAB_SIZE)
    expected[0, 1], expected[1, 0], expected[3, VOCAB_SIZE - 1] = 2, 1, 1
    assert torch.equal(counts, expected)


def test_metadata_skips_histories_when_unused():
    prompts, outputs = [[1, 2]], [[3]]
    off = build_metadata([SamplingParams()], prompts, outputs, None, "cpu")
    assert off.no_penalties and off.prompt_tokens is None and off.output_tokens is None
    presence = build_metadata([SamplingParams(presence_penalty=1.0)], prompts, outputs, None, "cpu")
    assert presence.prompt_tokens is None and presence.output_tokens.token_ids.tolist() == [3]
    repetition = build_metadata(
        [SamplingParams(repetition_penalty=1.2)] * 2, [[1, 2], [5]], [[], [6, 7]], None, "cpu"
    )
    assert repetition.prompt_tokens.token_ids.tolist() == [1, 2, 5]
    assert repetition.prompt_tokens.row_ids.tolist() == [0, 0, 1]
    assert repetition.output_tokens.row_ids.tolist() == [1, 1]


def test_min_tokens_mask_index_pairs():
    eos = 2
    params = [
        SamplingParams(min_tokens=3, stop_token_ids=(5, 6)),
        SamplingParams(min_tokens=1, stop_token_ids=(5,)),  # already has one output: no mask
        SamplingParams(min_tokens=2, ignore_eos=True, stop_token_ids=(9, VOCAB_SIZE + 100)),
        SamplingParams(min_tokens=4),
    ]
    metadata = build_metadata(params, [[0]] * 4, [[1, 1], [1], [], []], eos, "cpu")
    pairs = set(zip(metadata.min_tokens_rows.tolist(), metadata.min_tokens_token_ids.tolist(), strict=True))
    assert pairs == {(0, 2), (0, 5), (0, 6), (2, 9), (2, VOCAB_SIZE + 100), (3, 2)}
    logits = torch.randn(4, VOCAB_SIZE)
    masked = apply_min_tokens_mask(logits.clone(), metadata.min_tokens_rows, metadata.min_tokens_token_ids)
    expected = logits.clone()
    for row, token in pairs:
        if token < VOCAB_SIZE:
            expected[row, token] = float("-inf")
    assert torch.equal(masked, expected)


def test_sampler_applies_penalties_before_temperature_and_filters():
    # Token 0 would win greedily; the frequency penalty on its 3 occurrences makes token 1 win,
    # and top_k=1 after the penalty must then keep token 1 only.
    logits = torch.zeros(200, VOCAB_SIZE)
    logits[:, 0], logits[:, 1] = 5.0, 4.0
    params = [SamplingParams(frequency_penalty=1.0, top_k=1, temperature=0.7)] * 200
    metadata = build_metadata(params, [[7]] * 200, [[0, 0, 0]] * 200, None, "cpu")
    out = Sampler(VOCAB_SIZE, seed=0)(logits, metadata)
    assert set(out.token_ids.tolist()) == {1}

"""Sampler: filters against a float64 reference, seeds, greedy, min_tokens, logprobs (CPU only)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from sampling_reference import build_metadata
from shardserve.workers.request import SamplingParams
from shardserve.workers.sampling import logprobs as logprobs_module
from shardserve.workers.sampling.logprobs import compute_prompt_logprobs
from shardserve.workers.sampling.metadata import SamplingMetadata, step_seed
from shardserve.workers.sampling.sampler import (
    Sampler,
    apply_min_p,
    apply_top_k_only,
    apply_top_k_top_p,
    apply_top_k_top_p_candidates,
)

VOCAB_SIZE = 32
NUM_DRAWS = 3000


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)  # test inputs built with torch.randn are the same on every run


def build(params, prompts=None, outputs=None, eos=None) -> SamplingMetadata:
    num_rows = len(params)
    prompts = prompts if prompts is not None else [[1, 2, 3]] * num_rows
    outputs = outputs if outputs is not None else [[]] * num_rows
    return build_metadata(params, prompts, outputs, eos, "cpu")


def base_logits(seed: int = 0, vocab_size: int = VOCAB_SIZE) -> torch.Tensor:
    """Distinct logits in a shuffled order, probabilities between ~0.7% and ~14%."""
    g = torch.Generator().manual_seed(seed)
    return torch.linspace(2.0, -1.0, vocab_size)[torch.randperm(vocab_size, generator=g)]  # [vocab_size]


def reference_distribution(row: torch.Tensor, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> torch.Tensor:
    """Straightforward float64 filtering of one row: top-k, then top-p, then min-p, renormalised."""
    probs = torch.softmax(row.double() / temperature, dim=0)
    order = sorted(range(len(row)), key=lambda t: -probs[t].item())
    keep = order[:top_k] if top_k else list(order)
    if top_p < 1.0:
        mass = sum(probs[t].item() for t in keep)
        kept, cumulative = [], 0.0
        for t in keep:
            kept.append(t)
            cumulative += probs[t].item() / mass
            if cumulative >= top_p:
                break
        keep = kept
    if min_p > 0:
        top = max(probs[t].item() for t in keep)
        keep = [t for t in keep if probs[t].item() >= min_p * top]
    out = torch.zeros_like(probs)
    out[keep] = probs[keep]
    return out / out.sum()


FILTER_CASES = [
    dict(top_k=3),
    dict(top_k=1),
    dict(top_p=0.5),
    dict(top_p=0.93),
    dict(min_p=0.3),
    dict(top_k=10, top_p=0.6),
    dict(top_k=12, top_p=0.8, min_p=0.4),
    dict(temperature=0.5, top_p=0.7),
    dict(temperature=2.0, min_p=0.5),
    dict(),
]


@pytest.mark.parametrize("case", FILTER_CASES)
def test_filtered_distribution_matches_reference_exactly(case):
    row = base_logits(1)
    temperature = case.get("temperature", 1.0)
    logits = (row / temperature).unsqueeze(0).clone()  # [1, vocab_size]
    top_k = torch.tensor([case.get("top_k", 0)])
    top_p = torch.tensor([case.get("top_p", 1.0)])
    if "top_p" in case and "top_k" in case:
        candidates = apply_top_k_top_p_candidates(logits.clone(), top_k, top_p, int(top_k.max()))
        apply_top_k_top_p(logits, top_k, top_p)
        assert torch.equal(candidates > float("-inf"), logits > float("-inf"))
    elif "top_p" in case:
        apply_top_k_top_p(logits, None, top_p)
    elif "top_k" in case:
        apply_top_k_only(logits, top_k, int(top_k.max()))
    apply_min_p(logits, torch.tensor([case.get("min_p", 0.0)]))
    expected = reference_distribution(row, **case)
    got = torch.softmax(logits[0].double(), dim=0)
    assert torch.equal(got > 0, expected > 0), f"kept set differs for {case}"
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_top_k_only_and_sort_path_agree_with_mixed_rows():
    rows = torch.stack([base_logits(s) for s in range(4)])  # [4, vocab_size]
    top_k = torch.tensor([0, 5, VOCAB_SIZE + 7, 1])  # off, 5, larger than the vocabulary (off), 1
    a = apply_top_k_only(rows.clone(), top_k, int(top_k.max()))
    b = apply_top_k_top_p(rows.clone(), top_k, None)
    assert torch.equal(a, b)
    assert torch.equal(a[0], rows[0]) and torch.equal(a[2], rows[2])  # rows with top-k off untouched
    assert (a[1] > float("-inf")).sum() == 5 and (a[3] > float("-inf")).sum() == 1


MIXED_BATCHES = [
    # Sort path for top-p: some rows have top-k off.
    [dict(top_k=3), dict(top_p=0.5), dict(min_p=0.3), dict(), dict(top_k=10, top_p=0.6), dict(temperature=0)],
    # Every row has top-k on: top-p runs on the top-k candidates only.
    [
        dict(top_k=3),
        dict(top_k=20, top_p=0.5),
        dict(top_k=7, min_p=0.3),
        dict(top_k=12, top_p=0.8, temperature=0.6),
    ],
]


@pytest.mark.parametrize("cases", MIXED_BATCHES)
def test_mixed_batch_sample_sets_and_frequencies_match_reference(cases):
    """Rows with different filters in one batch: each row samples exactly its reference set."""
    row_logits = [base_logits(10 + i) for i in range(len(cases))]
    params, logits = [], []
    for _ in range(NUM_DRAWS // 3):  # interleave the cases through the batch
        for case, row in zip(cases, row_logits, strict=True):
            params.append(SamplingParams(**case))
            logits.append(row)
    out = Sampler(VOCAB_SIZE, seed=0)(torch.stack(logits), build(params))
    tokens = out.token_ids.view(-1, len(cases))  # [draws, num_cases]
    for i, (case, row) in enumerate(zip(cases, row_logits, strict=True)):
        if case.get("temperature") == 0:
            assert (tokens[:, i] == row.argmax()).all()
            continue
        expected = reference_distribution(row, **case)
        counts = Counter(tokens[:, i].tolist())
        assert set(counts) == set(torch.nonzero(expected).flatten().tolist()), case
        num = tokens.shape[0]
        for t, p in enumerate(expected.tolist()):
            sigma = (p * (1 - p) / num) ** 0.5
            assert abs(counts.get(t, 0) / num - p) <= 5 * sigma + 1e-9, (case, t)


def test_candidate_top_p_matches_full_sort_with_mixed_rows():
    rows = torch.stack([base_logits(s, 200) for s in range(6)]) * 2  # [6, 200]
    top_k = torch.tensor([1, 5, 40, 40, 17, 3])
    top_p = torch.tensor([0.5, 1.0, 0.3, 0.95, 0.7, 0.01])
    full = apply_top_k_top_p(rows.clone(), top_k, top_p)
    candidates = apply_top_k_top_p_candidates(rows.clone(), top_k, top_p, int(top_k.max()))
    assert torch.equal(full > float("-inf"), candidates > float("-inf"))
    kept = full > float("-inf")
    assert torch.equal(full[kept], candidates[kept]) and torch.equal(full[kept], rows[kept])


def test_probability_mass_of_top_p_set_reaches_p_and_is_minimal():
    row = base_logits(3)
    probs = torch.softmax(row.double(), dim=0)
    for p in (0.2, 0.45, 0.77, 0.99):
        logits = row.unsqueeze(0).clone()
        apply_top_k_top_p(logits, None, torch.tensor([p]))
        kept = logits[0] > float("-inf")
        mass = probs[kept].sum().item()
        smallest_kept = probs[kept].min().item()
        assert mass >= p and mass - smallest_kept < p  # reaches p; dropping the least likely would not


def test_seeded_row_is_independent_of_batch_composition_and_position():
    seeded = SamplingParams(temperature=1.0, seed=1234)
    flat = torch.zeros(1000)  # uniform: any two draws collide with probability 1/1000
    other = [SamplingParams(top_k=5), SamplingParams(temperature=0), SamplingParams(seed=7, top_p=0.9)]
    outputs = [[5, 6, 7]]
    alone = Sampler(1000, seed=0)(flat.unsqueeze(0), build([seeded], outputs=outputs)).token_ids[0]
    for position in range(4):
        params = list(other)
        params.insert(position, seeded)
        outs = [[1]] * len(params)
        outs[position] = outputs[0]
        logits = torch.randn(len(params), 1000)
        logits[position] = flat
        batched = Sampler(1000, seed=position + 99)(logits, build(params, outputs=outs))
        assert batched.token_ids[position] == alone
    # A preempted request re-samples the same position with a fresh sampler: same token.
    assert Sampler(1000)(flat.unsqueeze(0), build([seeded], outputs=[[9, 9, 9]])).token_ids[0] == alone


def test_seeds_and_positions_give_different_draws():
    flat = torch.zeros(4, 1000)
    params = [SamplingParams(seed=s) for s in (1, 2, 3, 4)]
    first = Sampler(1000)(flat, build(params, outputs=[[]] * 4)).token_ids
    second = Sampler(1000)(flat, build(params, outputs=[[0]] * 4)).token_ids
    assert len(set(first.tolist())) == 4  # different seeds, same position
    assert not torch.equal(first, second)  # same seeds, next position
    assert first.tolist() == Sampler(1000)(flat, build(params, outputs=[[]] * 4)).token_ids.tolist()


def test_seeded_rows_follow_the_filtered_distribution():
    row = base_logits(5)
    params = [SamplingParams(top_k=4, seed=s) for s in range(2000)]
    tokens = Sampler(VOCAB_SIZE)(row.expand(2000, -1), build(params)).token_ids
    expected = reference_distribution(row, top_k=4)
    assert set(tokens.tolist()) == set(torch.nonzero(expected).flatten().tolist())


def test_unseeded_rows_reproducible_with_engine_seed_only():
    logits = torch.zeros(64, 1000)
    params = [SamplingParams(top_p=0.9)] * 64
    a = Sampler(1000, seed=5)(logits, build(params)).token_ids
    b = Sampler(1000, seed=5)(logits, build(params)).token_ids
    c = Sampler(1000, seed=6)(logits, build(params)).token_ids
    assert torch.equal(a, b)
    assert (a != c).sum() > 32  # a different engine seed redraws (collisions have p = 1/1000)


def test_step_seed_depends_on_seed_and_position_and_fits_generator():
    values = {step_seed(s, t) for s in range(-3, 30) for t in range(30)}
    assert len(values) == 33 * 30
    assert step_seed(5, 1) != step_seed(6, 0)
    for s in (-(2**70), 2**70, 0):
        torch.Generator().manual_seed(step_seed(s, 3))
        assert 0 <= step_seed(s, 3) < 2**63


def test_greedy_equals_argmax_and_keeps_input_unchanged():
    logits = torch.randn(6, VOCAB_SIZE)
    before = logits.clone()
    params = [SamplingParams(temperature=0, top_k=3, top_p=0.5, min_p=0.5)] * 6
    out = Sampler(VOCAB_SIZE)(logits, build(params))
    assert torch.equal(out.token_ids, logits.argmax(dim=1))
    assert out.token_ids.dtype == torch.int64 and out.logprobs == [None] * 6
    assert torch.equal(logits, before)


def test_greedy_batch_takes_argmax_of_the_logits_as_given(monkeypatch):
    # bf16 logits as a GPU LM head could give, with a tie for the max in row 2: the index is the
    # float32 path's (the first max), logprobs too, and no float32 copy of the logits is made
    logits = torch.randn(5, VOCAB_SIZE).to(torch.bfloat16)
    logits[2, 3] = logits[2, 7] = logits[2].max() + 1
    params = [SamplingParams(temperature=0, logprobs=2)] * 5
    expected = Sampler(VOCAB_SIZE)(logits.float(), build(params))
    copies = []
    real_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: copies.append(a) or real_to(self, *a, **k))
    out = Sampler(VOCAB_SIZE)(logits, build(params))
    monkeypatch.undo()
    assert torch.equal(out.token_ids, expected.token_ids) and int(out.token_ids[2]) == 3
    assert out.logprobs == expected.logprobs
    assert not any(torch.float32 in a for a in copies)


def test_greedy_applies_penalties():
    logits = torch.zeros(1, VOCAB_SIZE)
    logits[0, 4], logits[0, 9] = 2.0, 1.5
    params = [SamplingParams(temperature=0, repetition_penalty=2.0)]
    out = Sampler(VOCAB_SIZE)(logits, build(params, prompts=[[4]], outputs=[[]]))
    assert out.token_ids.tolist() == [9]  # 2.0 / 2 = 1.0 < 1.5


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    eos, stop_id = 7, 11
    logits = torch.zeros(4, VOCAB_SIZE)
    logits[:, eos], logits[:, stop_id], logits[:, 3] = 10.0, 9.0, 8.0
    params = [
        SamplingParams(temperature=0, min_tokens=2, stop_token_ids=(stop_id,)),  # 1 output < 2
        SamplingParams(temperature=0, min_tokens=2, stop_token_ids=(stop_id,)),  # 2 outputs: reached
        SamplingParams(temperature=0, min_tokens=3, ignore_eos=True, stop_token_ids=(stop_id, 10_000)),
        SamplingParams(min_tokens=5, top_k=2, stop_token_ids=(stop_id,)),  # sampled: never eos/stop
    ]
    outputs = [[1], [1, 2], [], []]
    out = Sampler(VOCAB_SIZE, seed=0)(logits, build(params, outputs=outputs, eos=eos))
    assert out.token_ids.tolist()[:3] == [3, eos, eos]  # ignore_eos keeps EOS, masks stop id
    many = Sampler(VOCAB_SIZE, seed=0)(
        logits[3:].expand(500, -1), build([params[3]] * 500, outputs=[[]] * 500, eos=eos)
    )
    assert eos not in many.token_ids.tolist() and stop_id not in many.token_ids.tolist()


def test_logprobs_and_ranks_match_log_softmax_of_raw_logits():
    logits = torch.randn(5, VOCAB_SIZE) * 3
    logits[2, :4] = 20.0  # ties: four tokens share rank 1
    params = [
        SamplingParams(logprobs=3, temperature=0.3, repetition_penalty=1.7),
        SamplingParams(),  # not asking
        SamplingParams(logprobs=2, temperature=0),
        SamplingParams(logprobs=0, top_k=4),
        SamplingParams(logprobs=20),
    ]
    out = Sampler(VOCAB_SIZE, seed=0)(logits, build(params, prompts=[[0, 1]] * 5))
    expected = torch.log_softmax(logits.double(), dim=1)
    assert out.logprobs[1] is None
    for row, p in enumerate(params):
        if p.logprobs is None:
            continue
        entry = out.logprobs[row]
        sampled = out.token_ids[row].item()
        assert next(iter(entry)) == sampled  # sampled token first
        if row == 2:  # four-way tie at the top: which tied ids fill the top-2 is arbitrary
            assert len(entry) in (2, 3) and set(entry) <= {0, 1, 2, 3}
            assert all(lp.rank == 1 for lp in entry.values())
        else:
            top = expected[row].argsort(descending=True)[: p.logprobs].tolist()
            assert set(entry) == {sampled} | set(top)
        for token, lp in entry.items():
            assert lp.logprob == pytest.approx(expected[row, token].item(), abs=1e-5)
            assert lp.rank == 1 + int((expected[row] > expected[row, token] + 1e-9).sum())
    assert out.logprobs[2][out.token_ids[2].item()].rank == 1  # tied top tokens all have rank 1
    assert len(out.logprobs[3]) == 1


def test_prompt_logprobs_match_reference_across_chunks(monkeypatch):
    monkeypatch.setattr(logprobs_module, "PROMPT_LOGPROBS_CHUNK_SIZE", 3)
    prompt = [4, 9, 1, 30, 30, 2, 17, 5]
    logits = torch.randn(len(prompt) - 1, VOCAB_SIZE)  # row j predicts prompt[j + 1]
    result = compute_prompt_logprobs(logits, torch.tensor(prompt[1:]), top_n=2)
    expected = torch.log_softmax(logits.double(), dim=1)
    assert len(result) == len(prompt) - 1
    for j, entry in enumerate(result):
        target = prompt[j + 1]
        assert next(iter(entry)) == target
        assert set(entry) == {target} | set(expected[j].topk(2).indices.tolist())
        assert entry[target].logprob == pytest.approx(expected[j, target].item(), abs=1e-5)
        assert entry[target].rank == 1 + int((expected[j] > expected[j, target]).sum())


def test_bad_inputs_name_the_value():
    params = [SamplingParams()] * 2
    with pytest.raises(ValueError, match=r"vocab_size=32"):
        Sampler(VOCAB_SIZE)(torch.zeros(2, 31), build(params))
    with pytest.raises(ValueError, match="vocab_size must be >= 1"):
        Sampler(0)
    with pytest.raises(ValueError, match="top_n|num_top"):
        compute_prompt_logprobs(torch.zeros(2, 4), torch.tensor([0, 1]), top_n=5)

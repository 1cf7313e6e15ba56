"""SamplingState (incremental, per row) must equal the one-pass reference build over the same rows."""

from __future__ import annotations

import numpy as np
import torch
from sampling_reference import build_metadata
from shardserve.workers.request import SamplingParams
from shardserve.workers.runner.sampling_state import SamplingState
from shardserve.workers.sampling.metadata import SamplingMetadata
from shardserve.workers.sampling.penalties import apply_penalties

VOCAB = 50
EOS = 2


def _assert_same(ours: SamplingMetadata, ref: SamplingMetadata) -> None:
    for name in SamplingMetadata.__dataclass_fields__:
        a, b = getattr(ours, name), getattr(ref, name)
        if name in ("prompt_tokens", "output_tokens"):
            # Ours keeps histories of penalty rows only; rows with neutral penalties ignore them,
            # so what must match is the penalised logits.
            assert (a is None) == (b is None), name
        elif isinstance(b, torch.Tensor):
            assert torch.equal(a, b), name
        else:
            assert a == b, name
    if not ref.no_penalties:
        logits = torch.randn(ref.num_rows, VOCAB, generator=torch.Generator().manual_seed(1))
        expected = apply_penalties(logits.clone(), ref.prompt_tokens, ref.output_tokens, ref.repetition_penalties,
                                   ref.presence_penalties, ref.frequency_penalties)
        got = apply_penalties(logits.clone(), ours.prompt_tokens, ours.output_tokens, ours.repetition_penalties,
                              ours.presence_penalties, ours.frequency_penalties)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_incremental_state_matches_full_build_through_adds_moves_and_steps():
    params = {
        "greedy": SamplingParams(temperature=0),
        "seeded": SamplingParams(temperature=0.8, top_k=5, seed=3, min_tokens=2, stop_token_ids=[7]),
        "penal": SamplingParams(temperature=1.0, top_p=0.9, repetition_penalty=1.3, frequency_penalty=0.5),
        "plain": SamplingParams(temperature=0.7, min_p=0.1, logprobs=2),
    }
    prompts = {"greedy": [1, 2], "seeded": [3], "penal": [4, 4, 5], "plain": [6]}
    outputs = {k: [] for k in params}
    outputs["penal"] = [9, 9]  # resumed after preemption with two outputs
    state = SamplingState(max_rows=4, eos_token_id=EOS, device=torch.device("cpu"))
    rows: list[str] = []
    for rid in params:
        rows.append(rid)
        state.add(len(rows) - 1, params[rid], prompts[rid], list(outputs[rid]))

    def check(active: list[str], sampling: list[str]) -> None:
        idx = np.array([active.index(r) for r in sampling], dtype=np.int64)
        ref = build_metadata([params[r] for r in sampling], [prompts[r] for r in sampling],
                                     [outputs[r] for r in sampling], EOS, "cpu")
        _assert_same(state.build(idx), ref)

    rng = np.random.default_rng(0)
    for step in range(4):
        check(rows, rows)
        check(rows, [rows[2], rows[0]])  # a subset in another order (a mixed step)
        tokens = rng.integers(0, VOCAB, len(rows)).tolist()
        state.record(np.arange(len(rows)), tokens)
        for rid, token in zip(rows, tokens, strict=True):
            outputs[rid].append(token)
        if step == 1:  # "greedy" leaves row 0: the last row ("plain") moves into it
            state.clear(0)
            state.move(3, 0)
            rows = ["plain", "seeded", "penal"]
    check(rows, rows)

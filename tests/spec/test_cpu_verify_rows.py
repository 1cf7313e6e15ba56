"""Verify steps of 1 + k rows on the CPU fast path, and the n-gram proposer's draft length.

A verify step runs its rows through the packed kernels and the C++ decode stack together
(workers/quant/cpu_kernels/body.inc and, for int8 activations on AVX512-VNNI, wide512.inc take
activation rows in tiles, unpacking each weight block once per tile; the paged attention computes
each query row alone). Each row's sums keep the order of a one-row call, so (1) a matmul over M rows
equals M one-row matmuls bit for bit, on every instruction set and both activation modes (odd
weight-row and block counts, the Q8_0 head's layout), and (2) on the embedded SmolLM2 kept packed,
in both activation modes, the hidden state the LM head gets for each verified position equals, bit
for bit, the one the plain engine computed decoding that position alone.
(3) The n-gram proposer drafts more tokens the longer its match (ngram.py `draft_length`).
"""

from __future__ import annotations

import pytest
import torch
from shardserve.workers.bench.spec_tasks import TASKS
from shardserve.workers.llm import LLM
from shardserve.workers.quant.cpu_kernels import (
    DENSE_FROM_ROWS,
    PackedQ8,
    best_isa,
    decode_ops,
    pack_q4,
    pack_q8,
    q4_linear,
    q8_linear,
)
from shardserve.workers.quant.weights import GroupedWeight
from shardserve.workers.request import SamplingParams
from shardserve.workers.spec.ngram import NgramProposer

ISAS = ["scalar", "avx2", "avx512vnni"]


def _grouped(n: int, k: int, group: int, bits: int, seed: int) -> GroupedWeight:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8)
    scales = (torch.rand(n, k // group, generator=g) * 0.02 + 0.001).half().float()
    mins = (-(torch.rand(n, k // group, generator=g) * 2**bits) * scales).half().float()
    return GroupedWeight(q=q, scales=scales, mins=mins, group_size=group, bits=bits)


# (output rows, input features, group): even and odd weight-row counts (the 512-bit int8 kernels pair
# weight rows), an even and an odd number of 32-blocks (they take blocks in pairs, an odd last one
# masked), groups of one block (GGUF Q4_1, Q8_0) and of several; more than 16 groups (Q4_1's mins are
# summed 16 groups at a time, the rest masked).
SHAPES = [(24, 256, 64), (23, 96, 32), (17, 576, 32)]


@pytest.mark.parametrize("int8_activations", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_rows_together_equal_rows_alone_bit_for_bit(int8_activations: bool, shape: tuple[int, int, int]) -> None:
    n, k, group = shape
    q4, q8 = pack_q4(_grouped(n, k, group, 4, seed=1)), pack_q8(_grouped(n, k, group, 8, seed=2))
    # the GGUF head's Q8_0: blocks of 32, no mins
    q8_no_mins = PackedQ8.from_blocks(torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n, k // 32) * 0.01)
    bias = torch.randn(n)
    for isa in ISAS[: ISAS.index(best_isa()) + 1]:
        # tiles of 4 (AVX2) and 8 (AVX512) rows and every remainder; float activations from
        # DENSE_FROM_ROWS rows on take a dense F.linear instead (prefill), not these kernels
        for m in range(1, 18 if int8_activations else DENSE_FROM_ROWS):
            x = torch.randn(m, k)
            for linear, packed in ((q4_linear, q4), (q8_linear, q8), (q8_linear, q8_no_mins)):
                together = linear(x, packed, bias, isa=isa, int8_activations=int8_activations)
                alone = torch.cat([linear(x[i : i + 1], packed, bias, isa=isa, int8_activations=int8_activations)
                                   for i in range(m)])
                assert torch.equal(together, alone), (linear.__name__, isa, m)
                if int8_activations:
                    continue
                # float activations: within summation order of the dequantized matmul
                torch.testing.assert_close(together, x @ packed.dequantize().T + bias, rtol=1e-4, atol=1e-4)


def _hidden_by_position(llm: LLM, prompt: list[int], max_tokens: int) -> tuple[list[int], dict[int, torch.Tensor]]:
    """(greedy tokens, the hidden state handed to the LM head for each position) of one request. A
    verify step's rows after a rejected draft are recomputed by a later step: the last one counts."""
    model = llm.engine.loaded.model
    forward, head = model.forward, model.compute_logits
    positions: list[list[int]] = []
    by_position: dict[int, torch.Tensor] = {}

    def record_positions(token_ids, step_positions, *args, **kwargs):
        positions.append(step_positions.tolist())
        return forward(token_ids, step_positions, *args, **kwargs)

    def record(h: torch.Tensor) -> torch.Tensor:
        rows = positions[-1][-h.shape[0]:]  # a prefill samples its last row only
        by_position.update((p, row.clone()) for p, row in zip(rows, h, strict=True))
        return head(h)

    model.forward, model.compute_logits = record_positions, record
    try:
        out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=max_tokens))[0]
    finally:
        del model.forward, model.compute_logits
    return list(out.outputs[0].token_ids), by_position


@pytest.mark.slow
@pytest.mark.parametrize("cpu_activations", ["float", "int8"])
def test_verify_rows_on_the_decode_stack_equal_plain_decode_steps(cpu_activations: str) -> None:
    if decode_ops.ops() is None:
        pytest.skip("the CPU decode ops extension did not build here")
    plain = LLM("default", quantization="gguf", async_scheduling=False, cpu_activations=cpu_activations)
    prompt = plain.tokenizer.encode(plain.tokenizer.apply_chat_template(
        [{"role": "user", "content": TASKS["edit-code"]}], tokenize=False, add_generation_prompt=True),
        add_special_tokens=False)
    want_tokens, want = _hidden_by_position(plain, prompt, 24)
    spec = LLM("default", quantization="gguf", async_scheduling=False, cpu_activations=cpu_activations,
               speculative={"method": "ngram", "num_speculative_tokens": 4})
    got_tokens, got = _hidden_by_position(spec, prompt, 24)
    stats = spec.engine.stats().spec_decode
    assert got_tokens == want_tokens
    assert stats.num_accepted_tokens >= 5 and spec.engine.runner.step_times.eager_steps > 0
    assert len(want) >= 20 and set(want) <= set(got)
    # every verified position's hidden state: bit-identical to the plain engine's one-row step
    assert all(torch.equal(got[p], want[p]) for p in want)


def test_ngram_draft_length_follows_the_match_length() -> None:
    proposer = NgramProposer(min_n=2, max_n=4)
    # the context ends in [7, 8] (a bare 2-gram match): one draft token
    assert proposer.propose("a", [7, 8, 9, 10, 11, 12, 1, 2, 7, 8], 10, 8) == [9]
    # ends in [5, 6, 7, 8] which matched 4 tokens back and 2 more before: 6 - 2 + 1 = 5 tokens
    context = [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 0, 3, 4, 5, 6, 7, 8]
    assert proposer.propose("b", context, len(context), 8) == [9, 10, 11, 12, 13]
    assert proposer.propose("c", context, len(context), 3) == [9, 10, 11]  # capped by max_tokens
    assert proposer.draft_length(2) == 1 and proposer.draft_length(40) == 39

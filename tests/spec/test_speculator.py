"""The Speculator's policy alone (no model): the adaptive switch, per-request k and the back-off."""

from __future__ import annotations

from shardserve.workers.config import SpeculativeConfig
from shardserve.workers.request import Request, SamplingParams
from shardserve.workers.spec.speculator import (
    BACKOFF_AFTER_MISSES,
    MAX_BACKOFF_STEPS,
    PAUSE_AFTER_REJECTIONS,
    Speculator,
)


class Fixed:
    """Proposes `drafts` (a list the test changes) to everyone."""

    def __init__(self) -> None:
        self.drafts: list[int] = []

    def propose(self, request_id, token_ids, num_prompt_tokens, max_tokens):
        return self.drafts[:max_tokens]

    def finish(self, request_id, token_ids, num_prompt_tokens):
        pass


def _speculator(backoff: bool, k: int = 4, max_verify_tokens: int = 128) -> tuple[Speculator, Fixed]:
    proposer = Fixed()
    config = SpeculativeConfig(speculative_method="ngram", num_speculative_tokens=k, max_verify_tokens=max_verify_tokens)
    return Speculator(config, proposer=proposer, backoff=backoff), proposer


def _step(spec: Speculator, request: Request) -> tuple[bool, list[int]]:
    """One schedule: (speculating, drafts)."""
    active = spec.active(1)
    drafts = spec.propose(request, 8) if active else []
    spec.end_step(active, len(drafts))
    return active, drafts


def test_switch_follows_the_batch_size() -> None:
    spec, _ = _speculator(backoff=False, k=4, max_verify_tokens=10)
    assert spec.active(1) and spec.active(2) and not spec.active(3)


def test_each_request_k_follows_its_acceptance() -> None:
    spec, proposer = _speculator(backoff=False, k=4)
    proposer.drafts = [1, 2, 3, 4, 5, 6]
    request = Request("r", [1, 2, 3], SamplingParams())
    assert spec.propose(request, 8) == [1, 2, 3, 4]  # k caps it
    spec.record("r", 4, 1)  # one of four accepted: k drops to 2
    assert spec.propose(request, 8) == [1, 2]
    spec.record("r", 2, 2)  # all accepted: k grows by one
    assert spec.propose(request, 8) == [1, 2, 3]
    assert spec.propose(request, 2) == [1, 2]  # the scheduler's limit caps it too
    assert spec.stats.num_drafts == 2 and spec.stats.num_accepted_tokens == 3
    assert spec.stats.accepted_per_position == [2, 1, 0, 0]


def test_requests_needing_host_state_get_no_drafts() -> None:
    spec, proposer = _speculator(backoff=False)
    proposer.drafts = [7, 7]
    for params in (SamplingParams(seed=1), SamplingParams(logprobs=1), SamplingParams(repetition_penalty=1.2),
                   SamplingParams(min_tokens=3)):
        assert spec.propose(Request("r", [1], params), 4) == []


def test_only_requests_the_next_schedule_could_give_drafts_need_their_tokens_on_the_host() -> None:
    """may_propose_next (InFlightBatches syncs a speculating batch only for such requests)."""
    spec, proposer = _speculator(backoff=True)
    for params in (SamplingParams(seed=1), SamplingParams(logprobs=1), SamplingParams(repetition_penalty=1.2)):
        assert not spec.may_propose_next(Request("x", [1], params))
    assert spec.may_propose_next(Request("m", [1], SamplingParams(min_tokens=3)))  # reached in a few steps
    proposer.drafts = [9, 9]
    request = Request("r", [1, 2, 3], SamplingParams())
    assert spec.may_propose_next(request)
    for _ in range(PAUSE_AFTER_REJECTIONS):
        _step(spec, request)
        spec.record("r", 2, 0)  # all rejected: paused for the next schedule
    assert not spec.may_propose_next(request)
    assert _step(spec, request)[1] == []
    assert spec.may_propose_next(request) and _step(spec, request)[1] == [9]
    proposer.drafts = []
    while spec.may_propose_next(request):  # misses in a row until the back-off skips the next schedule
        _step(spec, request)
    assert spec._skip and not spec.active(1)


def test_back_off_after_a_run_of_misses_and_reset_on_a_draft() -> None:
    spec, proposer = _speculator(backoff=True)
    request = Request("r", [1, 2, 3], SamplingParams())
    pattern = [_step(spec, request)[0] for _ in range(BACKOFF_AFTER_MISSES)]
    assert pattern == [True] * BACKOFF_AFTER_MISSES  # misses in a short run: still speculating
    assert [_step(spec, request)[0] for _ in range(2)] == [False, True]  # skip 1, then try
    assert [_step(spec, request)[0] for _ in range(3)] == [False, False, True]  # skip 2
    for _ in range(200):
        _step(spec, request)
    assert spec._skip <= MAX_BACKOFF_STEPS
    proposer.drafts = [5]
    while not _step(spec, request)[0]:
        pass
    assert spec._misses == 0 and _step(spec, request) == (True, [5])


def test_no_back_off_without_async_overlap_to_lose() -> None:
    spec, _ = _speculator(backoff=False)
    request = Request("r", [1, 2, 3], SamplingParams())
    assert all(_step(spec, request)[0] for _ in range(50))


def test_a_request_whose_drafts_keep_failing_pauses_its_proposals() -> None:
    spec, proposer = _speculator(backoff=False)
    proposer.drafts = [9, 9]
    request = Request("r", [1, 2, 3], SamplingParams())
    for _ in range(PAUSE_AFTER_REJECTIONS):
        assert _step(spec, request)[1]
        spec.record("r", 2, 0)  # all rejected
    assert _step(spec, request)[1] == []  # paused one step
    assert _step(spec, request)[1] == [9]  # k fell to 1 after the rejections
    spec.record("r", 1, 0)
    assert [_step(spec, request)[1] for _ in range(3)] == [[], [], [9]]  # paused two steps
    spec.record("r", 1, 1)  # accepted: no more pauses
    assert _step(spec, request)[1] == [9, 9]


class Batched(Fixed):
    """A batched proposer (as the draft model): the Speculator asks it once per step."""

    batched = True

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[list[tuple[str, int]]] = []  # per propose_batch call: (request id, max_tokens)

    def propose(self, request_id, token_ids, num_prompt_tokens, max_tokens):
        raise AssertionError("a prefetched request must be served from its batch")

    def propose_batch(self, queries):
        self.calls.append([(q.request_id, q.max_tokens) for q in queries])
        return [self.drafts[: q.max_tokens] for q in queries]


def test_a_batched_proposer_is_asked_once_per_step_for_every_eligible_request() -> None:
    proposer = Batched()
    proposer.drafts = [5, 6, 7, 8, 9]
    spec = Speculator(SpeculativeConfig(speculative_method="ngram", num_speculative_tokens=4), proposer=proposer)
    a = Request("a", [1, 2, 3], SamplingParams(max_tokens=100))
    b = Request("b", [1, 2], SamplingParams(max_tokens=3))  # room for 2 drafts + the target's token
    seeded = Request("c", [1, 2], SamplingParams(seed=1))  # not eligible: never asked
    spec.prefetch([a, b, seeded], max_model_len=1000)
    assert proposer.calls == [[("a", 4), ("b", 2)]]
    assert spec.propose(a, 3) == [5, 6, 7]  # cut to the scheduler's limit
    assert spec.propose(b, 8) == [5, 6]
    assert spec.propose(seeded, 8) == []
    spec.end_step(True, 5)
    spec.prefetch([a], max_model_len=5)  # 3 tokens in a context of 5: room for 1 draft
    assert proposer.calls[-1] == [("a", 1)]


def test_prefetch_leaves_host_proposers_alone() -> None:
    spec, proposer = _speculator(backoff=False)
    proposer.drafts = [1, 2]
    request = Request("r", [1, 2, 3], SamplingParams())
    spec.prefetch([request], max_model_len=1000)  # not batched: nothing asked ahead
    assert spec.propose(request, 8) == [1, 2]

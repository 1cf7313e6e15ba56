"""Speculator: the scheduler's side of speculative decoding (who gets drafts, how many, what was accepted).
Per step `Scheduler.schedule()` asks `active(num_running)` once (speculate only while running
requests x (1 + k) <= max_verify_tokens), then `propose(request, limit, num_unknown)` per decoding
request: the proposer's (proposer.py) drafts, capped by the request's own k. The runner samples the
target at [last token, drafts...] and keeps the drafts up to the first disagreement plus the
target's own token there: exact rejection sampling for deterministic drafts (greedy outputs are
identical, sampled ones keep the target's distribution). `record(...)` (applied results only)
folds a verify step into the statistics and the request's k (+1 while all is accepted, down to 1
after misses); a request whose drafts keep being rejected pauses a while.
`overlap` (async scheduling, a host proposer): a verify step is not applied before the next is
scheduled; a request in flight is fed a PLACEHOLDER for its bonus token plus drafts guessed past
it: the proposer continues the host's tokens past its guess of the `num_unknown` tokens in flight
(drafts assumed accepted). A rejection rolls the request back
(scheduler/in_flight.py). A batched proposer (the draft model, asked once per step through
`prefetch`) needs the accepted tokens: its speculating steps are applied before the next is
scheduled, and on a GPU runs of steps with nothing to propose back off (`end_step`). Requests
whose sampling needs per-token host state (penalties, a seed, logprobs, min_tokens not yet
reached) are never given drafts.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from shardserve.workers.config import SpeculativeConfig
from shardserve.workers.request import Request, SamplingParams
from shardserve.workers.spec.factory import make_proposer
from shardserve.workers.spec.proposer import DraftQuery, Proposer

# Back-off (async scheduling on a GPU): after this many speculating steps in a row with nothing to
# propose, plain steps between tries double up to MAX_BACKOFF_STEPS. Misses come in short runs on
# repetitive text (where speculation pays) and never end on text with no repeats.
BACKOFF_AFTER_MISSES = 4
# A request whose drafts were all rejected this many verify steps in a row pauses its proposals
# (1, 2, 4 ... MAX_BACKOFF_STEPS steps): a verify step costs more than a plain one.
PAUSE_AFTER_REJECTIONS = 2
MAX_BACKOFF_STEPS = 16


@dataclass
class SpecDecodeStats:
    """Totals since start, of applied results only (a result dropped after a rejection or a finish
    in flight counts nothing): steps that verified drafts, drafts (requests given >= 1 draft token
    in a step), draft tokens proposed and accepted, accepted counts per draft position (0 = first)."""

    num_spec_steps: int = 0
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a verify step yields per draft on average: accepted drafts + the target's own token."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    def snapshot(self) -> SpecDecodeStats:
        return SpecDecodeStats(self.num_spec_steps, self.num_drafts, self.num_draft_tokens,
                               self.num_accepted_tokens, list(self.accepted_per_position))


class Speculator:
    def __init__(self, config: SpeculativeConfig, proposer: Proposer | None = None, backoff: bool = False,
                 async_scheduling: bool = False) -> None:
        self.config = config
        self.k = config.num_speculative_tokens
        self.proposer = proposer or make_proposer(config)
        # verify steps overlap the next (module docstring): host proposers under async scheduling
        self.overlap = async_scheduling and not getattr(self.proposer, "batched", False)
        self.backoff = backoff and not self.overlap  # only a synchronous speculating step costs the overlap
        self.stats = SpecDecodeStats(accepted_per_position=[0] * self.k)
        self._k_of: dict[str, int] = {}  # request id -> its current k (adaptive)
        self._asked = 0  # requests asked for drafts in the current step
        self._misses = 0  # speculating steps in a row that asked and got no draft
        self._num_steps = 0  # schedules so far (end_step calls)
        self._rejected: dict[str, int] = {}  # request id -> verify steps in a row with nothing accepted
        self._paused_until: dict[str, int] = {}  # request id -> the step its proposals resume
        self._skip = 0  # steps left to skip
        self._batched = bool(getattr(self.proposer, "batched", False))
        self._prefetched: dict[str, list[int]] = {}  # request id -> this step's drafts (batched proposers)

    def active(self, num_running: int) -> bool:
        """Speculate this step? Only while the batch's verify tokens stay within max_verify_tokens,
        and not while backing off after steps whose requests had nothing to propose."""
        if num_running * (1 + self.k) > self.config.max_verify_tokens:
            return False
        if self._skip:
            self._skip -= 1
            return False
        return True

    def end_step(self, speculating: bool, num_draft_tokens: int) -> None:
        """After a schedule. With `backoff` (async scheduling on a GPU, where a speculating step
        costs the overlap), BACKOFF_AFTER_MISSES speculating steps in a row whose requests were
        asked and had no drafts start a back-off: 1, 2, 4 ... MAX_BACKOFF_STEPS plain steps
        between tries; any draft resets it. A step in which nobody could be asked (all in flight:
        the step that re-synchronises) does not count."""
        self._num_steps += 1
        self._prefetched.clear()
        if not speculating:
            return
        if num_draft_tokens:
            self._misses = 0
        elif self._asked and self.backoff:
            self._misses += 1
            if self._misses >= BACKOFF_AFTER_MISSES:
                self._skip = min(MAX_BACKOFF_STEPS, 1 << (self._misses - BACKOFF_AFTER_MISSES))
        self._asked = 0

    def prefetch(self, requests: Iterable[Request], max_model_len: int) -> None:
        """Batched proposers only: draft in one call for each of `requests` (the decoding ones the
        scheduler may ask this step) that `propose` would serve, each up to its k and its room
        (max_tokens, max_model_len); `propose` cuts them to the step's limit."""
        if not self._batched:
            return
        queries = []
        for request in requests:
            if not self._may_propose(request):
                continue
            room = min(request.sampling_params.max_tokens - request.num_output_tokens - 1,
                       max_model_len - len(request.all_token_ids) - 1)
            max_tokens = min(self._k_of.get(request.request_id, self.k), room)
            if max_tokens > 0:
                queries.append(DraftQuery(request.request_id, request.all_token_ids, request.num_prompt_tokens,
                                          max_tokens))
        if queries:
            drafts = self.proposer.propose_batch(queries)
            self._prefetched.update((q.request_id, d) for q, d in zip(queries, drafts, strict=True))

    def _may_propose(self, request: Request) -> bool:
        if not eligible(request.sampling_params, request.num_output_tokens):
            return False
        # a request whose last drafts were all rejected pauses: a verify step would cost more than it gives
        return self._paused_until.get(request.request_id, 0) <= self._num_steps

    def may_propose_next(self, request: Request) -> bool:
        """Could the next schedule give this request drafts, were its tokens on the host? False when
        its sampling never takes drafts (a seed, logprobs, penalties; min_tokens is left out: it is
        reached), its proposals pause past the next schedule, or the next schedule backs off.
        (InFlightBatches skips the sync of a speculating batch where no request could.)"""
        if self._skip or not eligible(request.sampling_params, request.sampling_params.min_tokens):
            return False
        return self._paused_until.get(request.request_id, 0) <= self._num_steps

    def propose(self, request: Request, limit: int, num_unknown: int = 0) -> list[int]:
        """Drafts for a decoding request: at most min(its k, limit); [] if it is not eligible.
        `num_unknown` (overlap): tokens the batches in flight add past the host's, if all their
        drafts are kept; the drafts follow the proposer's guess of them."""
        if limit <= 0 or not self._may_propose(request):
            return []
        self._asked += 1
        max_tokens = min(self._k_of.get(request.request_id, self.k), limit)
        if num_unknown:
            if not self.overlap:
                raise RuntimeError("drafts past tokens in flight need an overlapping Speculator")
            return self.proposer.propose(request.request_id, request.all_token_ids, request.num_prompt_tokens,
                                         max_tokens, num_unknown)
        prefetched = self._prefetched.pop(request.request_id, None)
        if prefetched is not None:
            return prefetched[:max_tokens]
        return self.proposer.propose(request.request_id, request.all_token_ids, request.num_prompt_tokens,
                                     max_tokens)

    def record(self, request_id: str, num_drafts: int, num_accepted: int) -> None:
        """One verified draft of `num_drafts` tokens, `num_accepted` of them kept."""
        stats = self.stats
        stats.num_drafts += 1
        stats.num_draft_tokens += num_drafts
        stats.num_accepted_tokens += num_accepted
        for position in range(num_accepted):
            stats.accepted_per_position[position] += 1
        k = self._k_of.get(request_id, self.k)
        self._k_of[request_id] = min(self.k, k + 1) if num_accepted == num_drafts else max(1, num_accepted + 1)
        rejected = self._rejected.get(request_id, 0) + 1 if num_accepted == 0 else 0
        self._rejected[request_id] = rejected
        if rejected >= PAUSE_AFTER_REJECTIONS:  # pause its proposals 1, 2, 4 ... steps
            pause = min(MAX_BACKOFF_STEPS, 1 << (rejected - PAUSE_AFTER_REJECTIONS))
            self._paused_until[request_id] = self._num_steps + pause

    def finish(self, request: Request) -> None:
        self._k_of.pop(request.request_id, None)
        self._rejected.pop(request.request_id, None)
        self._paused_until.pop(request.request_id, None)
        self.proposer.finish(request.request_id, request.all_token_ids, request.num_prompt_tokens)

    def close(self) -> None:
        """Release the proposer's resources (the draft model's engine)."""
        close = getattr(self.proposer, "close", None)
        if close is not None:
            close()


def eligible(params: SamplingParams, num_outputs: int) -> bool:
    """Sampling that reads only the logits of its position (no per-token host state)."""
    return (params.seed is None and params.logprobs is None and num_outputs >= params.min_tokens
            and params.repetition_penalty == 1.0 and params.presence_penalty == 0
            and params.frequency_penalty == 0)

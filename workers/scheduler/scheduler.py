"""Scheduler: the policy — who runs each step (continuous or static batching, chunked prefill,
preemption by recompute, FCFS or priority) — and the sampled tokens folded back into requests.

`schedule()` gives each running request (admission order) min(tokens left, budget left) tokens;
when a block table cannot grow it preempts (FCFS: the last admitted; priority: the largest
(priority, arrival)) until it fits or the request itself is the victim; then, unless it
preempted, admits waiting requests from their prefix-cache hit while max_num_seqs, budget and
blocks allow. Out goes a `SchedulerOutput` (step_types.py). `update_from_output()` advances
`num_computed_tokens`, caches full blocks, appends tokens and applies token stops (EOS, stop
ids, max_tokens, max_model_len); finished ids reach the runner in the next output. It must
follow every `schedule()`, even an empty one: it returns the requests `schedule()` finished
(kv_cache_full: alone and still unable to grow). Static mode admits a batch of up to
max_num_seqs only when nothing runs. With D = `max_batches_in_flight` > 1 (InFlightBatches,
workers/inflight.py) `schedule()` runs again before earlier results are applied; where each
request stands is `self.in_flight` (in_flight.py), which the policy only reads: a request in
flight is never a preemption victim; under pipeline stages it is skipped and each batch takes
about 1/D of the requests; under async scheduling it is in every batch, fed placeholders.
Speculation (workers/spec/): a decoding request may get drafts (never at the cost of a preemption);
`update_from_output` keeps the accepted ones, stopping at a stop. With Speculator.overlap a request
in flight gets drafts too, assuming all drafts in flight kept; a rejection rolls it back (in_flight.py).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from shardserve.workers.config import CacheConfig, SchedulerConfig
from shardserve.workers.kv_cache.manager import KVCacheManager
from shardserve.workers.request import FinishReason, Request, RequestStatus
from shardserve.workers.scheduler.in_flight import InFlightRequests
from shardserve.workers.scheduler.queue import FCFSQueue, RequestQueue, make_request_queue
from shardserve.workers.spec.speculator import Speculator
from shardserve.workers.step_types import ModelRunnerOutput, NewRequestData, ScheduledRequest, SchedulerOutput

KV_CACHE_FULL = "kv_cache_full"  # stop_reason of a request that alone outgrew the KV pool


@dataclass(frozen=True)
class SchedulerStats:
    num_running: int
    num_waiting: int
    num_preemptions: int  # total since start
    kv_cache_usage: float  # fraction of usable blocks held, in [0, 1]
    prefix_cache_hit_rate: float  # hit tokens / looked-up tokens, in [0, 1]


@dataclass
class _Step:
    """Decisions of one `schedule()` call while they are being made."""

    token_budget: int
    max_requests: int  # requests this batch may hold (Scheduler._batch_cap)
    num_new_tokens: dict[str, int] = field(default_factory=dict)  # request id -> tokens, batch order
    preempted_ids: list[str] = field(default_factory=list)
    speculate: bool = False  # propose drafts this step (Speculator.active)
    drafts: dict[str, list[int]] = field(default_factory=dict)  # request id -> its drafts (in num_new_tokens)


class Scheduler:
    def __init__(
        self,
        scheduler_config: SchedulerConfig,
        cache_config: CacheConfig,
        kv_manager: KVCacheManager,
        max_model_len: int,
        max_batches_in_flight: int = 1,
        async_scheduling: bool = False,
        speculator: Speculator | None = None,
    ) -> None:
        if max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {max_model_len}")
        if kv_manager.block_size != cache_config.block_size:
            raise ValueError(
                f"kv_manager.block_size ({kv_manager.block_size}) must equal "
                f"cache_config.block_size ({cache_config.block_size})"
            )
        if max_batches_in_flight < 1:
            raise ValueError(f"max_batches_in_flight must be >= 1, got {max_batches_in_flight}")
        if async_scheduling and max_batches_in_flight < 2:
            raise ValueError(f"async scheduling keeps 2 or more batches in flight, got max_batches_in_flight={max_batches_in_flight}")
        self.config = scheduler_config
        self.cache_config = cache_config
        self.kv = kv_manager
        self.max_model_len = max_model_len
        self.requests: dict[str, Request] = {}  # every unfinished request by id
        self.waiting: RequestQueue = make_request_queue(scheduler_config.policy)
        self.running: list[Request] = []  # admission order
        # Static mode: members of the current batch not admitted yet (or preempted).
        self._batch_pending: RequestQueue = FCFSQueue()
        # ids sent as NewRequestData and not dropped since -> block ids the runner holds for them
        # (each step sends only the blocks appended since: the wire stays small at long contexts)
        self._runner_blocks: dict[str, int] = {}
        self._finished_ids: list[str] = []  # runner-known ids finished since the last schedule()
        self._finished_in_schedule: list[Request] = []  # kv_cache_full, reported by update_from_output
        self.num_preemptions = 0
        # Batches in flight (see the module docstring); both stay empty at 1.
        self.max_batches_in_flight = max_batches_in_flight
        self.async_scheduling = async_scheduling
        # Pipeline parallelism: requests in flight wait, batches share the requests out.
        self._pipelined = max_batches_in_flight > 1 and not async_scheduling
        self.in_flight = InFlightRequests(kv_manager)
        self.speculator = speculator
        # requests in flight get drafts too (Speculator.overlap: async scheduling, a host proposer)
        self._overlap = speculator is not None and speculator.overlap and async_scheduling

    # ---- requests in and out -----------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a new request. Raises ValueError for a request that could never be served."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in the scheduler")
        if request.status is not RequestStatus.WAITING or request.num_computed_tokens:
            raise ValueError(f"request {request.request_id!r} must be new (status waiting), got {request!r}")
        num_prompt = request.num_prompt_tokens
        if not 1 <= num_prompt <= self.max_model_len:
            raise ValueError(
                f"prompt length must be in [1, max_model_len={self.max_model_len}], got {num_prompt}"
            )
        if not self.config.enable_chunked_prefill and num_prompt > self.config.max_num_batched_tokens:
            raise ValueError(
                f"prompt length must be <= max_num_batched_tokens={self.config.max_num_batched_tokens} "
                f"when chunked prefill is disabled, got {num_prompt}"
            )
        num_blocks = self.kv.num_blocks_for(num_prompt)
        if num_blocks > self.kv.num_usable_blocks:
            raise ValueError(
                f"prompt length {num_prompt} needs {num_blocks} KV blocks; the pool has "
                f"{self.kv.num_usable_blocks} (at most {self.kv.num_usable_blocks * self.kv.block_size} tokens)"
            )
        self.requests[request.request_id] = request
        self.waiting.push(request)

    def finish_request(
        self, request_id: str, reason: FinishReason, stop_reason: str | int | None = None
    ) -> None:
        """End a request wherever it is and free its blocks now; unknown or finished ids are ignored."""
        request = self.requests.get(request_id)
        if request is not None:
            self._finish(request, reason, stop_reason)

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        for request_id in request_ids:
            self.finish_request(request_id, FinishReason.ABORT)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- counters -----------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self._batch_pending)

    @property
    def num_waiting_prompt_tokens(self) -> int:
        """Prompt tokens of the waiting requests (what admission control bounds)."""
        return sum(len(r.prompt_token_ids) for r in itertools.chain(self.waiting, self._batch_pending))

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=self.num_running,
            num_waiting=self.num_waiting,
            num_preemptions=self.num_preemptions,
            kv_cache_usage=self.kv.usage,
            prefix_cache_hit_rate=self.kv.prefix_cache_stats.hit_rate,
        )

    # ---- one step ------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        step = _Step(token_budget=self.config.max_num_batched_tokens, max_requests=self._batch_cap())
        step.speculate = self.speculator is not None and self.speculator.active(len(self.running))
        pipelined = self._pipelined
        candidates = self._batch_candidates(step.max_requests) if pipelined else list(self.running)
        if step.speculate:  # a batched proposer (draft model) drafts for all decoding requests at once
            self._prefetch_drafts(candidates)
        for request in candidates:
            if step.token_budget == 0:
                break
            if request.status is RequestStatus.RUNNING:  # not preempted earlier in this loop
                self._schedule_running(request, step)
        if not step.preempted_ids:  # a step that had to preempt has no blocks to spare
            self._admit_waiting(step)
        return self._build_output(step)

    def update_from_output(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput
    ) -> list[Request]:
        """Apply one step's results. Returns the requests that got a token this step, plus any
        the scheduler itself finished during `schedule()` (kv_cache_full, no new token)."""
        now = time.monotonic()
        updated, self._finished_in_schedule = self._finished_in_schedule, []
        track = self.max_batches_in_flight > 1
        requests, sampled_token_ids = self.requests, runner_output.sampled_token_ids
        verified = False  # an applied (not dropped) result verified drafts: a speculative step
        for scheduled in scheduler_output.scheduled:
            request_id = scheduled.request_id
            if track and self.in_flight.returned(scheduled):
                continue  # finished while in flight: its result is dropped
            request = requests.get(request_id)
            if request is None or request.status is not RequestStatus.RUNNING:
                continue  # finished or aborted since schedule(): its blocks are already free
            # its seq_len, but for drafts (their K/V counts once they are accepted)
            request.num_computed_tokens = scheduled.start_position + len(scheduled.token_ids) - scheduled.num_drafts
            self.kv.cache_full_blocks(request)
            if not scheduled.sample:
                continue
            token_id = sampled_token_ids.get(request_id)
            if token_id is None:
                raise RuntimeError(f"runner output has no sampled token for request {request_id!r}")
            if scheduled.num_drafts:
                accepted = runner_output.accepted_draft_ids.get(request_id, ())
                self._apply_drafts(request, scheduled.num_drafts, accepted, now)
                verified = True
                if request.is_finished:
                    updated.append(request)
                    continue
                if track and len(accepted) < scheduled.num_drafts:
                    self.in_flight.roll_back(request_id)  # later batches assumed every draft kept
            request.append_output_token(token_id)
            request.metrics.record_token(now)
            self._check_stop(request, token_id)
            updated.append(request)
        if verified:
            assert self.speculator is not None
            self.speculator.stats.num_spec_steps += 1
        return updated

    def _apply_drafts(self, request: Request, num_drafts: int, accepted: tuple[int, ...], now: float) -> None:
        """Append the accepted drafts (their K/V is in the cache) until one ends the request."""
        assert self.speculator is not None
        self.speculator.record(request.request_id, num_drafts, len(accepted))
        for token_id in accepted:
            request.append_output_token(token_id)
            request.metrics.record_token(now)
            request.num_computed_tokens += 1
            self._check_stop(request, token_id)
            if request.is_finished:
                return
        self.kv.cache_full_blocks(request)

    # ---- internals ------------------------------------------------------------------------------

    def _batch_cap(self) -> int:
        """Requests one batch may hold: max_num_seqs at P = 1, else an even share of the demand."""
        depth = self.max_batches_in_flight
        if not self._pipelined:  # one stage (async scheduling too): every batch may hold everyone
            return self.config.max_num_seqs
        demand = min(self.config.max_num_seqs, len(self.running) + self.num_waiting)
        return max(1, -(-demand // depth))

    def _batch_candidates(self, max_requests: int) -> list[Request]:
        """The first `max_requests` running requests not in flight, in admission order."""
        in_flight = self.in_flight.ahead
        return list(itertools.islice((r for r in self.running if r.request_id not in in_flight), max_requests))

    def _schedule_running(self, request: Request, step: _Step) -> None:
        in_flight = self.in_flight
        ahead = in_flight.ahead.get(request.request_id)
        if ahead is not None and in_flight.ends_in_flight(request, ahead, self.max_model_len):
            return
        start, end = in_flight.scheduled_end(request, ahead)
        num_new = end - start
        if num_new > step.token_budget:  # mostly all it has left fits (a decode always does)
            num_new = self._num_tokens_to_schedule(request, start, step.token_budget, end)
        if num_new == 0:
            return
        # The table must also cover the tokens of the batch in flight (async scheduling).
        num_ahead = start - request.num_computed_tokens
        drafts: list[int] = []
        if step.speculate and num_new == 1 and start == end - 1 and (ahead is None or self._overlap):
            # in flight (overlap): drafts guessed past the tokens its batches add if all is accepted
            num_unknown = ahead[2] if ahead is not None else 0
            drafts = self._propose(request, end, step.token_budget - 1, num_unknown)
            if drafts and self.kv.allocate_slots(request, num_ahead + 1 + len(drafts)):
                num_new += len(drafts)
            else:
                drafts = []  # no room for them: never preempt for drafts
        while not self.kv.allocate_slots(request, num_ahead + num_new):
            candidates = self._victim_candidates()
            if not candidates:
                return  # every running request is in flight (async scheduling): wait for a batch
            victim = self._pick_victim(candidates)
            if victim is request and in_flight.ahead and self._pick_victim(self.running) is not request:
                return  # the policy's victim is in flight: wait for its batch rather than preempt this one
            if victim is request and len(self.running) == 1:
                # Everything else is already preempted: this request can never grow here.
                self._finish(request, FinishReason.LENGTH, KV_CACHE_FULL)
                self._finished_in_schedule.append(request)
                return
            self._preempt(victim)
            step.preempted_ids.append(victim.request_id)
            # A victim scheduled earlier this step (priority policy) gives its tokens back.
            step.token_budget += step.num_new_tokens.pop(victim.request_id, 0)
            step.drafts.pop(victim.request_id, None)
            if victim is request:
                return
        step.num_new_tokens[request.request_id] = num_new
        step.token_budget -= num_new
        if drafts:
            step.drafts[request.request_id] = drafts

    def _prefetch_drafts(self, candidates: list[Request]) -> None:
        """The requests `_schedule_running` will ask for drafts: decoding (one known token to
        compute) and nothing in flight."""
        assert self.speculator is not None
        ahead = self.in_flight.ahead
        decoding = [r for r in candidates if r.request_id not in ahead
                    and len(r.all_token_ids) - r.num_computed_tokens == 1]
        self.speculator.prefetch(decoding, self.max_model_len)

    def _propose(self, request: Request, num_tokens: int, token_budget: int, num_unknown: int) -> list[int]:
        """Drafts for a decoding request whose tokens end at `num_tokens`, `num_unknown` of them
        still in flight, leaving room for the target's own token within max_tokens, max_model_len
        and this step's token budget."""
        assert self.speculator is not None
        limit = min(token_budget, request.sampling_params.max_tokens - request.num_output_tokens - num_unknown - 1,
                    self.max_model_len - num_tokens - 1)
        return self.speculator.propose(request, limit, num_unknown)

    def _admit_waiting(self, step: _Step) -> None:
        queue = self.waiting
        if self.config.mode == "static":
            # Only members of the current batch are admitted; a new batch forms once the
            # previous one is entirely done (nothing running, no member left to admit).
            queue = self._batch_pending
            if not self.running and not self._batch_pending:
                while self.waiting and len(self._batch_pending) < self.config.max_num_seqs:
                    self._batch_pending.push(self.waiting.pop())
        elif self.running:
            num_free_slots = self.config.max_num_seqs - len(self.running)
            if num_free_slots < min(self.config.min_admit_batch, len(queue)):
                return  # wait until a burst can join (see SchedulerConfig.min_admit_batch)
        now = time.monotonic()
        while (queue and step.token_budget > 0 and len(self.running) < self.config.max_num_seqs
               and len(step.num_new_tokens) < step.max_requests):
            request = queue.peek()
            computed = self.kv.get_computed_blocks(request)
            num_new = self._num_tokens_to_schedule(request, computed.num_computed_tokens, step.token_budget)
            if self.in_flight.holds_blocks_of(request.request_id):
                break  # its id's previous holder is still in flight; keep queue order
            if num_new == 0 or not self.kv.allocate_slots(request, num_new, computed):
                break  # keep queue order: nothing overtakes the head
            queue.pop()
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = computed.num_computed_tokens
            if request.metrics.first_scheduled_time is None:
                request.metrics.first_scheduled_time = now
                request.num_cached_tokens = computed.num_computed_tokens
                request.metrics.num_cached_prompt_tokens = min(
                    computed.num_computed_tokens, request.num_prompt_tokens
                )
            self.running.append(request)
            step.num_new_tokens[request.request_id] = num_new
            step.token_budget -= num_new

    def _num_tokens_to_schedule(self, request: Request, num_computed: int, token_budget: int,
                                num_tokens: int | None = None) -> int:
        num_remaining = (request.num_tokens if num_tokens is None else num_tokens) - num_computed
        if num_remaining <= token_budget:
            return num_remaining
        if self.config.enable_chunked_prefill:
            return token_budget
        # Chunking off: whole or wait. Only a request resumed after preemption can exceed a
        # whole step's budget (prompt + outputs); it would never fit whole, so it recomputes in chunks.
        return token_budget if num_remaining > self.config.max_num_batched_tokens else 0

    def _victim_candidates(self) -> list[Request]:
        """Running requests that may be preempted: those not in flight (their blocks are in use)."""
        in_flight = self.in_flight.ahead
        if not in_flight:
            return self.running
        return [r for r in self.running if r.request_id not in in_flight]

    def _pick_victim(self, candidates: list[Request]) -> Request:
        """The policy's victim among `candidates` (running requests in admission order)."""
        if self.config.policy == "priority":
            # Largest (priority, arrival); among equals the later admitted.
            _, victim = max(
                enumerate(candidates),
                key=lambda item: (item[1].priority, item[1].metrics.arrival_time, item[0]),
            )
            return victim
        return candidates[-1]

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0  # recompute prompt + outputs on resume
        request.metrics.num_preemptions += 1
        self.num_preemptions += 1
        self._runner_blocks.pop(request.request_id, None)
        admission_queue = self._batch_pending if self.config.mode == "static" else self.waiting
        admission_queue.push_front(request)

    def _check_stop(self, request: Request, token_id: int) -> None:
        params = request.sampling_params
        num_output = len(request.output_token_ids)
        if num_output >= params.min_tokens:
            if not params.ignore_eos and token_id == request.eos_token_id:
                self._finish(request, FinishReason.STOP)
                return
            if token_id in params.stop_token_ids:
                self._finish(request, FinishReason.STOP, token_id)
                return
        if num_output >= params.max_tokens or len(request.all_token_ids) >= self.max_model_len:
            self._finish(request, FinishReason.LENGTH)

    def _finish(self, request: Request, reason: FinishReason, stop_reason: str | int | None = None) -> None:
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request in self._batch_pending:
            self._batch_pending.remove(request)
        else:
            self.waiting.remove(request)
        self.in_flight.free(request)  # now, or when the batches in flight holding it return
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.stop_reason = stop_reason
        request.metrics.finished_time = time.monotonic()
        del self.requests[request.request_id]
        if self.speculator is not None:
            self.speculator.finish(request)
        if self._runner_blocks.pop(request.request_id, None) is not None:
            self._finished_ids.append(request.request_id)

    def _build_output(self, step: _Step) -> SchedulerOutput:
        new_requests: list[NewRequestData] = []
        decodes: list[ScheduledRequest] = []
        prefills: list[ScheduledRequest] = []
        track = self.max_batches_in_flight > 1
        requests, runner_blocks, in_flight = self.requests, self._runner_blocks, self.in_flight
        ahead, fed_token_ids = in_flight.ahead, in_flight.fed_token_ids
        for request_id, num_new in step.num_new_tokens.items():
            request = requests[request_id]
            num_sent = runner_blocks.get(request_id)
            if num_sent is None:
                num_sent = 0
                new_requests.append(
                    NewRequestData(
                        request_id=request_id,
                        prompt_token_ids=tuple(request.prompt_token_ids),
                        output_token_ids=tuple(request.output_token_ids),
                        sampling_params=request.sampling_params,
                    )
                )
            start, end = in_flight.scheduled_end(request, ahead.get(request_id))
            # Tables only grow while the runner holds them: send the blocks appended since.
            new_block_ids = self.kv.get_block_ids(request_id, num_sent)
            runner_blocks[request_id] = num_sent + len(new_block_ids)
            drafts = step.drafts.get(request_id)
            num_known = num_new - len(drafts) if drafts else num_new
            sample = start + num_known == end
            token_ids = fed_token_ids(request.all_token_ids, start, num_known)
            scheduled = ScheduledRequest(
                request_id=request_id,
                token_ids=(*token_ids, *drafts) if drafts else token_ids,
                start_position=start,
                new_block_ids=new_block_ids,
                sample=sample,
                num_drafts=len(drafts) if drafts else 0,
            )
            if track:
                in_flight.track(request_id, num_new, sample + (len(drafts) if drafts else 0))
            # "Decode" = a one-token query; such rows go first (the output's documented order).
            (decodes if num_new == 1 else prefills).append(scheduled)
        finished_ids, self._finished_ids = tuple(self._finished_ids), []
        num_draft_tokens = sum(map(len, step.drafts.values())) if step.drafts else 0
        if self.speculator is not None:
            self.speculator.end_step(step.speculate, num_draft_tokens)
        return SchedulerOutput(
            new_requests=tuple(new_requests),
            scheduled=tuple(decodes + prefills),
            num_batched_tokens=sum(step.num_new_tokens.values()),
            preempted_request_ids=tuple(step.preempted_ids),
            finished_request_ids=finished_ids,
            num_draft_tokens=num_draft_tokens,
            speculating=step.speculate,
        )


"""InFlightBatches: the engine's batches submitted and not applied yet, one object for every mode.

    fill()     → scheduler.schedule() and executor.submit() until `depth` batches are in flight;
                 a schedule with nothing to run is not sent but returned, for the engine to apply
                 at once, and its runner drops (finished / preempted ids) ride with the next batch
    collect()  → the oldest batch and its output (waited for); the scheduler applies all of it
    kept(batch) → the batch minus the results to drop (then those its rejected drafts voided)
    drop_later_results(ids) → finished requests that later batches in flight still hold

Depth 1 is the synchronous engine: each step submits one batch and collects it. With one pipeline
stage, depth 2+ is async scheduling (SchedulerConfig.async_depth): batch N+1 is launched behind
batch N, so the host applies N while the device runs N+1, and the scheduler feeds placeholders
for the tokens in flight (scheduler/in_flight.py). With P stages the depth is
ParallelConfig.pipeline_depth so every stage has work; a request is then in at most one batch,
and the next batch leaves before the collected one's outputs are built (`refill_before_outputs`).
A request finished while later batches hold it (EOS, stop id or string, abort), or rolled back by a
rejected draft, has their results dropped here; a finished one's blocks are freed when the last of
them returns. A batch sampling for a request with penalties, or a speculating batch whose proposer
needs the accepted tokens (the draft model: no Speculator.overlap), is collected before the next is
scheduled (`Batch.needs_sync`).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from shardserve.workers.stats import BatchQueueStats
from shardserve.workers.step_types import ModelRunnerOutput, SchedulerOutput

if TYPE_CHECKING:
    from shardserve.workers.request import Request, SamplingParams
    from shardserve.workers.scheduler.scheduler import Scheduler
    from shardserve.workers.worker.channel import StepHandle
    from shardserve.workers.worker.executor import Executor


@dataclass(frozen=True)
class Batch:
    """A submitted batch whose output has not been applied yet."""

    sched: SchedulerOutput
    handle: StepHandle
    needs_sync: bool = False  # collect before scheduling the next batch (async scheduling, penalties)


@dataclass(frozen=True)
class BatchResult:
    """A batch back from the executor (or a schedule with nothing to run), ready to apply;
    after `InFlightBatches.kept`, without the results of requests finished while in flight."""

    sched: SchedulerOutput
    request_ids: list[str]
    output: ModelRunnerOutput = field(default_factory=ModelRunnerOutput)
    needs_sync: bool = False  # it held the queue (Batch.needs_sync): the next batch leaves before its outputs


class InFlightBatches:
    def __init__(self, scheduler: Scheduler, executor: Executor, depth: int, async_scheduling: bool) -> None:
        self.scheduler = scheduler
        self.executor = executor
        self.depth = depth
        self.async_scheduling = async_scheduling
        self.refill_before_outputs = depth > 1 and not async_scheduling  # pipeline stages
        self.stats = BatchQueueStats()
        self._batches: deque[Batch] = deque()  # oldest first
        # sample id -> results still to drop: it finished while in that many batches in flight
        self._drop: Counter[str] = Counter()
        self._carried_finished: tuple[str, ...] = ()  # runner drops of schedules never sent
        self._carried_preempted: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self._batches)

    def fill(self) -> BatchResult | None:
        """Schedule and submit until `depth` batches are in flight; returns a schedule with nothing
        to run (every running request in flight, or none can start), which ends the fill."""
        while len(self._batches) < self.depth:
            if self._batches and self._batches[-1].needs_sync:
                return None
            sched = self._with_carried_drops(self.scheduler.schedule())
            if sched.is_empty:
                self._carried_finished = sched.finished_request_ids
                self._carried_preempted = sched.preempted_request_ids
                return BatchResult(sched, [])
            needs_sync = self.async_scheduling and (self._may_draft_next(sched) or self._samples_with_penalties(sched))
            self._batches.append(Batch(sched, self.executor.submit(sched), needs_sync))
            self.stats.record_submit(len(self._batches))
        return None

    def collect(self) -> BatchResult | None:
        """The oldest batch in flight with its output (waits for it); None when none is."""
        if not self._batches:
            return None
        batch = self._batches.popleft()
        output = self.executor.collect(batch.handle)
        return BatchResult(batch.sched, [r.request_id for r in batch.sched.scheduled], output, batch.needs_sync)

    def kept(self, batch: BatchResult) -> BatchResult:
        """`batch` minus one result of each request with results to drop (finished in flight, or
        stale); then the later batches' results that `batch`'s rejected drafts voided are to drop."""
        dropped = {r for r in batch.request_ids if r in self._drop} if self._drop else None
        if self.scheduler.in_flight.rolled_back:  # after this batch's own drops: they are later results
            self._drop.update(self.scheduler.in_flight.take_rolled_back())
        if not dropped:
            return batch
        self._drop.subtract(dropped)  # one result each
        self._drop = +self._drop  # forget ids with none left to drop
        return BatchResult(batch.sched, [r for r in batch.request_ids if r not in dropped],
                           _without(batch.output, dropped), batch.needs_sync)

    def drop_later_results(self, sample_ids: Iterable[str]) -> None:
        """Drop the results of the batches in flight that hold these (finished) sample ids."""
        for sample_id in sample_ids:
            count = self.scheduler.in_flight.num_batches(sample_id)
            if count:
                self._drop[sample_id] += count

    def drop_finished(self, advanced: list[Request]) -> None:
        """Requests a batch's token finished (EOS, stop id) while later batches hold them (async)."""
        if self.async_scheduling:
            self.drop_later_results([r.request_id for r in advanced if r.is_finished])

    def _may_draft_next(self, sched: SchedulerOutput) -> bool:
        """True if `sched` speculates and the next schedule could give one of its sampling requests
        drafts (proposals follow the tokens on the host): not when each of them may never have any
        (a seed, logprobs, penalties) or pauses its proposals past the next schedule."""
        speculator = self.scheduler.speculator
        if not sched.speculating or speculator is None or speculator.overlap:
            return False
        if sched.num_draft_tokens:
            return True
        requests = self.scheduler.requests
        for scheduled in sched.scheduled:
            request = requests.get(scheduled.request_id)
            if scheduled.sample and request is not None and speculator.may_propose_next(request):
                return True
        return False

    def _samples_with_penalties(self, sched: SchedulerOutput) -> bool:
        """True if `sched` samples for a request whose penalties need its previous token on the host."""
        requests = self.scheduler.requests
        for scheduled in sched.scheduled:
            request = requests.get(scheduled.request_id)
            if scheduled.sample and request is not None and _uses_penalties(request.sampling_params):
                return True
        return False

    def _with_carried_drops(self, sched: SchedulerOutput) -> SchedulerOutput:
        """`sched` plus the runner drops of earlier schedules that were never sent (the runner
        applies drops before additions, so a dropped id may come back in this very batch)."""
        if not (self._carried_finished or self._carried_preempted):
            return sched
        merged = replace(sched, finished_request_ids=self._carried_finished + sched.finished_request_ids,
                         preempted_request_ids=self._carried_preempted + sched.preempted_request_ids)
        self._carried_finished = self._carried_preempted = ()
        return merged


def _uses_penalties(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1.0 or params.presence_penalty != 0 or params.frequency_penalty != 0


def _without(output: ModelRunnerOutput, request_ids: set[str]) -> ModelRunnerOutput:
    """`output` minus the entries of `request_ids` (requests finished while in flight)."""
    return ModelRunnerOutput(
        sampled_token_ids={k: v for k, v in output.sampled_token_ids.items() if k not in request_ids},
        accepted_draft_ids={k: v for k, v in output.accepted_draft_ids.items() if k not in request_ids},
        logprobs={k: v for k, v in output.logprobs.items() if k not in request_ids},
        prompt_logprobs={k: v for k, v in output.prompt_logprobs.items() if k not in request_ids},
    )

"""What the scheduler decided for one step: the typed message from scheduler to model runner.

Every field is plain data (ints, tuples, frozen dataclasses) so the same object can later be
sent to worker processes. The runner keeps a small state per request id, created from
`NewRequestData` the first time a request is scheduled (or again after a preemption) and
dropped when the id appears in `finished_request_ids` or `preempted_request_ids`.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardserve.workers.request import SamplingParams


@dataclass(frozen=True)
class NewRequestData:
    """Sent once when a request (re)joins the running set."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    output_token_ids: tuple[int, ...]  # non-empty when resuming after preemption
    sampling_params: SamplingParams


@dataclass(frozen=True)
class ScheduledRequest:
    """One request's work this step.

    token_ids: the tokens fed this step, `all_token_ids[start_position:start_position+n]`.
    start_position: tokens of this request already in the KV cache (= their positions start here).
    new_block_ids: the blocks appended to the request's block table since the runner last saw
      it — the whole table when the request (re)joins (it is in `new_requests` this step).
      Tables only grow, so the runner rebuilds each one from these.
    sample: True when this chunk reaches the last known token, so one new token is sampled.
    """

    request_id: str
    token_ids: tuple[int, ...]
    start_position: int
    new_block_ids: tuple[int, ...]
    sample: bool

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def seq_len(self) -> int:
        """Context length after this step: cached tokens plus this step's tokens."""
        return self.start_position + len(self.token_ids)


@dataclass(frozen=True)
class SchedulerOutput:
    new_requests: tuple[NewRequestData, ...]
    scheduled: tuple[ScheduledRequest, ...]  # decodes first, then prefills, in batch order
    num_batched_tokens: int
    preempted_request_ids: tuple[str, ...] = ()
    finished_request_ids: tuple[str, ...] = ()  # freed since the previous step

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

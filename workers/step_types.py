"""The typed messages of one engine step: what the scheduler decided, and what the runner sampled.

`SchedulerOutput` goes from the scheduler to the model runner (through the executor, pickled to
every rank): every field is plain data (ints, tuples, frozen dataclasses). The runner keeps a
small state per request id, created from `NewRequestData` the first time a request is scheduled
(or again after a preemption) and dropped when the id appears in `finished_request_ids` or
`preempted_request_ids`. `ModelRunnerOutput` comes back from the output rank to the engine, which
hands it to the scheduler (token bookkeeping) and the output processor (text, logprobs: `Logprob`
per token id, `PromptLogprobs` per prompt chunk). One module for all of them, so scheduler,
runner, sampling and engine import the boundary, not each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shardserve.workers.request import Logprob, SamplingParams


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
    num_drafts: speculative decoding: the last `num_drafts` of token_ids are draft tokens
      (proposed, not known to follow); the runner samples at each of them and at the last known
      token, and returns the drafts the target agreed with (`ModelRunnerOutput.accepted_draft_ids`).
    """

    request_id: str
    token_ids: tuple[int, ...]
    start_position: int
    new_block_ids: tuple[int, ...]
    sample: bool
    num_drafts: int = 0

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
    num_draft_tokens: int = 0  # sum of the requests' num_drafts (speculative decoding)
    speculating: bool = False  # speculation is on this step: apply it before scheduling the next

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


# token id -> Logprob (logprob, rank); the engine adds the decoded text when it builds outputs.
TokenLogprobs = dict[int, Logprob]


@dataclass(frozen=True)
class PromptLogprobs:
    """One prompt chunk's logprobs: entry i scores absolute prompt position `first_position + i`
    (None for position 0, which has no prediction)."""

    first_position: int
    entries: list[TokenLogprobs | None]


@dataclass(frozen=True)
class ModelRunnerOutput:
    """sampled_token_ids: request id -> the token sampled this step (only requests with `sample`).
    logprobs: request id -> the sampled token's logprob plus the top-N (requests asking for it).
    prompt_logprobs: request id -> one entry per prompt position this step's chunk scores. Keyed
      by position because a request preempted mid-prompt recomputes its prompt from the start
      and reports those positions again.
    accepted_draft_ids: request id -> the leading drafts the target agreed with (requests with
      num_drafts only); they come before the request's sampled token, which is the target's own
      token at the first disagreement (or after the last draft).
    """

    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    accepted_draft_ids: dict[str, tuple[int, ...]] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    prompt_logprobs: dict[str, PromptLogprobs] = field(default_factory=dict)

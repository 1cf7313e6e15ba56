"""What the model runner returns for one step (the typed message back to the engine)."""

from __future__ import annotations

from dataclasses import dataclass, field

# token id -> (logprob, rank); the engine adds decoded text when it builds outputs.
TokenLogprobs = dict[int, tuple[float, int]]


@dataclass(frozen=True)
class ModelRunnerOutput:
    """sampled_token_ids: request id -> the token sampled this step (only requests with `sample`).
    logprobs: request id -> the sampled token's logprob plus the top-N (requests asking for it).
    prompt_logprobs: request id -> (first position, entries): one entry per prompt position this
      step's chunk scores, entry i for absolute prompt position `first position + i` (None for
      position 0, which has no prediction). Keyed by position because a request preempted
      mid-prompt recomputes its prompt from the start and reports those positions again.
    """

    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs | None]]] = field(default_factory=dict)

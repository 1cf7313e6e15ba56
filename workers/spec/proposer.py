"""The proposer interface of speculative decoding, and the factory that picks one from the config.

A proposer drafts tokens from token ids alone: `propose(request_id, token_ids, num_prompt_tokens,
max_tokens)` returns up to `max_tokens` ids to follow `token_ids` (the request's prompt + outputs
so far; the list only grows between calls for one id), [] for none; `propose_batch(queries)` does
the same for several requests at once (default: one `propose` each; a proposer whose `batched` is
true — the draft model — runs them as one batch, and the Speculator then asks it once per step);
`finish(...)` is called once when the request leaves the engine (finished, aborted or preempted
for good), so per-request state is dropped and a proposer that learns from outputs (suffix) adds
them; `close()` releases what the proposer holds (the draft's engine). Drafts are deterministic
(one token per position), which is what makes verification by plain sampling exact
(workers/spec/speculator.py). Host-side proposers (ngram, suffix) need only the config; the draft
model also needs the target engine's config and model (`TargetModel`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from shardserve.workers.config import EngineConfig, SpeculativeConfig

if TYPE_CHECKING:
    from shardserve.workers.models.loader import LoadedModel


@dataclass(frozen=True)
class DraftQuery:
    """One request's ask in `propose_batch`: the arguments of `propose`."""

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    max_tokens: int


@dataclass(frozen=True)
class TargetModel:
    """What a proposer may need to know of the target engine: its config (device, dtype, KV block
    size and limits), its loaded model (vocabulary, tokenizer) and its KV pool size in blocks."""

    config: EngineConfig
    loaded: LoadedModel
    num_blocks: int


class Proposer(Protocol):
    batched: bool = False  # True: propose_batch runs one batch, so the Speculator asks once per step

    def propose(self, request_id: str, token_ids: list[int], num_prompt_tokens: int,
                max_tokens: int) -> list[int]: ...

    def finish(self, request_id: str, token_ids: list[int], num_prompt_tokens: int) -> None: ...

    def propose_batch(self, queries: Sequence[DraftQuery]) -> list[list[int]]:
        """Drafts per query, in order; the default asks `propose` once per query."""
        return [self.propose(q.request_id, q.token_ids, q.num_prompt_tokens, q.max_tokens) for q in queries]

    def close(self) -> None:
        """Release what the proposer holds (default: nothing)."""


def make_proposer(config: SpeculativeConfig, target: TargetModel | None = None) -> Proposer:
    if config.speculative_method == "ngram":
        from shardserve.workers.spec.ngram import NgramProposer

        return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
    if config.speculative_method == "suffix":
        from shardserve.workers.spec.suffix import SuffixProposer

        return SuffixProposer(max_cached_tokens=config.suffix_max_cached_tokens, max_depth=config.suffix_max_depth,
                              min_probability=config.suffix_min_probability)
    if config.speculative_method == "draft":
        if target is None:
            raise ValueError("speculative method `draft` needs the target model (TargetModel) to build its draft")
        from shardserve.workers.spec.draft import DraftModelProposer

        return DraftModelProposer(config, target)
    raise ValueError(f"no proposer for speculative_method {config.speculative_method!r}")

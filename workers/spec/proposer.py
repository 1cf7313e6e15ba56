"""The proposer interface of speculative decoding, and the factory that picks one from the config.

A proposer drafts tokens on the host from token ids alone: `propose(request_id, token_ids,
num_prompt_tokens, max_tokens)` returns up to `max_tokens` ids to follow `token_ids` (the
request's prompt + outputs so far; the list only grows between calls for one id), [] for none;
`finish(...)` is called once when the request leaves the engine (finished, aborted or preempted
for good), so per-request state is dropped and a proposer that learns from outputs (suffix) adds
them. Drafts are deterministic (one token per position), which is what makes verification by
plain sampling exact (workers/spec/speculator.py).
"""

from __future__ import annotations

from typing import Protocol

from shardserve.workers.config import SpeculativeConfig


class Proposer(Protocol):
    def propose(self, request_id: str, token_ids: list[int], num_prompt_tokens: int,
                max_tokens: int) -> list[int]: ...

    def finish(self, request_id: str, token_ids: list[int], num_prompt_tokens: int) -> None: ...


def make_proposer(config: SpeculativeConfig) -> Proposer:
    if config.speculative_method == "ngram":
        from shardserve.workers.spec.ngram import NgramProposer

        return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
    if config.speculative_method == "suffix":
        from shardserve.workers.spec.suffix import SuffixProposer

        return SuffixProposer(max_cached_tokens=config.suffix_max_cached_tokens, max_depth=config.suffix_max_depth,
                              min_probability=config.suffix_min_probability)
    raise ValueError(f"no proposer for speculative_method {config.speculative_method!r}")

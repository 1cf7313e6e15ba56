"""The proposer interface of speculative decoding (factory.py picks one from the config).

A proposer drafts tokens from token ids alone: `propose(request_id, token_ids, num_prompt_tokens,
max_tokens, num_unknown)` returns up to `max_tokens` ids to follow `token_ids` (the request's prompt
+ outputs so far; the list only grows between calls for one id) and `num_unknown` tokens still in
flight (their guess is not returned; only host proposers take num_unknown > 0), [] for none; `propose_batch(queries)` does
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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from shardserve.workers.config import EngineConfig

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
    size and limits), its loaded model (vocabulary, tokenizer) and its KV pool size in blocks.
    Under TP / PP > 1 `loaded.model` is None (the weights are in the ranks): hf_config, tokenizer
    and limits are always there, the module only in a single-process engine (self_draft.py shares it)."""

    config: EngineConfig
    loaded: LoadedModel
    num_blocks: int
    engine_factory: Callable[..., Any]  # the target's engine class: the draft model runs in another of it


class Proposer(Protocol):
    batched: bool = False  # True: propose_batch runs one batch, so the Speculator asks once per step

    def propose(self, request_id: str, token_ids: list[int], num_prompt_tokens: int,
                max_tokens: int, num_unknown: int = 0) -> list[int]: ...

    def finish(self, request_id: str, token_ids: list[int], num_prompt_tokens: int) -> None: ...

    def propose_batch(self, queries: Sequence[DraftQuery]) -> list[list[int]]:
        """Drafts per query, in order; the default asks `propose` once per query."""
        return [self.propose(q.request_id, q.token_ids, q.num_prompt_tokens, q.max_tokens) for q in queries]

    def close(self) -> None:
        """Release what the proposer holds (default: nothing)."""

"""make_proposer: the proposer a SpeculativeConfig names (ngram.py, suffix.py, draft.py);
check_proposer: its start-up checks that need no weights (the engine runs them first).

Kept apart from proposer.py (the interface every proposer imports) so that the interface module
imports none of its implementations.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shardserve.workers.config import ModelConfig, SpeculativeConfig
from shardserve.workers.spec.proposer import Proposer, TargetModel

if TYPE_CHECKING:
    from shardserve.workers.models.loader import LoadedModel


def check_proposer(config: SpeculativeConfig, target_model: ModelConfig, target: LoadedModel) -> None:
    """What can be refused before the target's weights load (its ranks start): the draft model's
    vocabulary and layer count, from the target's header (config, tokenizer). Raises ValueError."""
    if config.speculative_method == "draft":
        from shardserve.workers.spec.draft import check_draft

        check_draft(config, target_model, target)


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

"""Speculative decoding under tensor parallel 2 (gloo, two CPU processes): the ranks verify the
drafts the driver's scheduler proposed, and greedy outputs equal the single-process plain engine.

The tiny random Llama falls into loops under greedy decoding, so n-gram drafts from its own
output are accepted often; the test checks they were, or it would prove nothing. KV blocks must
all come back (rejected drafts leave nothing behind). The draft model (the same checkpoint cut to
3 of its 4 layers: self-speculation) runs at TP 1 in the driver beside the TP 2 target, whose
weights live only in the ranks: it loads its own copy. Its run repeats every prompt with a KV
pool too small for them all (prefix-cache hits, preemption by recompute). Bad drafts are refused
at start-up under TP 2 too: another vocabulary or layer count before the ranks start, a KV pool
that does not fit once they run (and then they are stopped).
(The embedded SmolLM2 itself cannot run at TP 2: its 9 attention heads do not split in two.)
"""

from __future__ import annotations

import multiprocessing
from dataclasses import replace

import pytest
from parallel_helpers import engine_config, make_prompts, run_engine, single_process, write_checkpoint
from shardserve.workers.config import CacheConfig, SpeculativeConfig
from shardserve.workers.engine import LLMEngine
from shardserve.workers.spec.draft import DraftModelProposer

MAX_TOKENS = 32
PROMPTS = make_prompts(250, lengths=(5, 11, 23, 40))


def _greedy(config, prompts: dict[str, list[int]]) -> tuple[dict[str, tuple[int, ...]], LLMEngine]:
    """Greedy token ids (no logprobs: they would keep requests from speculating) and the engine."""
    engine = LLMEngine(config)
    try:
        return run_engine(engine, prompts, MAX_TOKENS, logprobs=False).token_ids, engine
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_checkpoint("llama", tmp_path_factory.mktemp("spec-tp") / "llama")


@pytest.fixture(scope="module")
def want(folder) -> dict[str, tuple[int, ...]]:
    """The single-process plain engine's greedy outputs."""
    return _greedy(single_process(engine_config(folder, tp=2)), PROMPTS)[0]


def test_tp2_ngram_equals_single_process_plain(folder, want) -> None:
    spec = SpeculativeConfig(speculative_method="ngram", num_speculative_tokens=4, prompt_lookup_min=1)
    got, engine = _greedy(replace(engine_config(folder, tp=2), speculative=spec), PROMPTS)
    assert got == want
    stats = engine.stats().spec_decode
    assert stats.num_accepted_tokens > 10, stats


def test_tp2_target_with_layer_truncated_draft_equals_single_process_plain(folder, want) -> None:
    spec = SpeculativeConfig(speculative_method="draft", draft_model=str(folder), draft_num_layers=3,
                             num_speculative_tokens=3)
    # every prompt twice (the copies hit the prefix cache) in a pool too small for all 8: preemption
    config = replace(engine_config(folder, tp=2), speculative=spec, cache=CacheConfig(block_size=4, num_blocks=40))
    twice = PROMPTS | {f"again-{key}": prompt for key, prompt in PROMPTS.items()}
    got, engine = _greedy(config, twice)
    assert got == want | {f"again-{key}": tokens for key, tokens in want.items()}
    stats = engine.stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hit_rate > 0, stats
    assert stats.spec_decode.num_accepted_tokens > 10, stats.spec_decode
    proposer = engine.speculator.proposer
    assert isinstance(proposer, DraftModelProposer)
    assert engine.loaded.model is None  # the target's weights are in the ranks only...
    assert len(proposer.engine.loaded.model.model.layers) == 3  # ...the draft holds its own 3 layers


@pytest.mark.parametrize(("options", "message"), [
    # checked on the target's config and tokenizer before the ranks start
    ({"draft_model": "dummy:tiny-llama"}, "has a vocabulary of 256 tokens, the target 'llama' one of 250"),
    ({"draft_num_layers": 5}, "draft_num_layers must be in [1, 4] (the draft model's num_hidden_layers), got 5"),
    # checked once the ranks run (the draft's pool is sized after the target's): they are stopped
    ({"draft_num_blocks": 10**9}, "the draft model does not fit: its KV pool of 1000000000 blocks"),
])
def test_tp2_bad_drafts_are_refused_at_start_up_and_leave_no_rank(folder, options: dict, message: str) -> None:
    spec = SpeculativeConfig(speculative_method="draft", **{"draft_model": str(folder), **options})
    with pytest.raises(ValueError) as info:
        LLMEngine(replace(engine_config(folder, tp=2), speculative=spec))
    assert message in str(info.value)
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("shardserve-rank")]

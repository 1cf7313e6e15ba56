"""Speculative decoding under tensor parallel 2 (gloo, two CPU processes): the ranks verify the
drafts the driver's scheduler proposed, and greedy outputs equal the single-process plain engine.

The tiny random Llama falls into loops under greedy decoding, so n-gram drafts from its own
output are accepted often; the test checks they were, or it would prove nothing. KV blocks must
all come back (rejected drafts leave nothing behind).
"""

from __future__ import annotations

from dataclasses import replace

from parallel_helpers import engine_config, make_prompts, run_engine, single_process, write_checkpoint
from shardserve.workers.config import SpeculativeConfig
from shardserve.workers.engine import LLMEngine

MAX_TOKENS = 32


def _greedy(config, prompts: dict[str, list[int]]) -> tuple[dict[str, tuple[int, ...]], LLMEngine]:
    """Greedy token ids (no logprobs: they would keep requests from speculating) and the engine."""
    engine = LLMEngine(config)
    try:
        return run_engine(engine, prompts, MAX_TOKENS, logprobs=False).token_ids, engine
    finally:
        engine.shutdown()


def test_tp2_ngram_equals_single_process_plain(tmp_path) -> None:
    folder = write_checkpoint("llama", tmp_path / "llama")
    base = engine_config(folder, tp=2)
    prompts = make_prompts(250, lengths=(5, 11, 23, 40))
    want, _ = _greedy(single_process(base), prompts)
    spec = SpeculativeConfig(speculative_method="ngram", num_speculative_tokens=4, prompt_lookup_min=1)
    got, engine = _greedy(replace(base, speculative=spec), prompts)
    assert got == want
    stats = engine.stats().spec_decode
    assert stats.num_accepted_tokens > 10, stats

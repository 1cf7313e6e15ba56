"""Speculative decoding under tensor parallel 2 (gloo, two CPU processes): the ranks verify the
drafts the driver's scheduler proposed, and greedy outputs equal the single-process plain engine.

The tiny random Llama falls into loops under greedy decoding, so n-gram drafts from its own
output are accepted often; the test checks they were, or it would prove nothing. KV blocks must
all come back (rejected drafts leave nothing behind).
"""

from __future__ import annotations

from dataclasses import replace

from parallel_helpers import engine_config, make_prompts, single_process, write_checkpoint
from shardserve.workers.config import SpeculativeConfig
from shardserve.workers.engine import LLMEngine
from shardserve.workers.request import SamplingParams

MAX_TOKENS = 32


def _greedy(config, prompts: dict[str, list[int]]) -> tuple[dict[str, tuple[int, ...]], LLMEngine]:
    engine = LLMEngine(config)
    try:
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
        for request_id, token_ids in prompts.items():
            engine.add_request(request_id, token_ids, params)
        finals = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    finals[out.request_id] = out.outputs[0].token_ids
        assert engine.kv_manager.num_free_blocks == engine.num_blocks - 1, "KV blocks leaked"
        return finals, engine
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

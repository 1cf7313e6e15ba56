"""Greedy token equality with Hugging Face transformers on the real SmolLM2-135M-Instruct.

Eight prompts of different lengths run together through our engine under several batching
regimes; every output must equal running that prompt alone through `transformers.generate`.
"""

from __future__ import annotations

import pytest
import torch
from shardserve.workers.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from shardserve.workers.engine import LLMEngine
from shardserve.workers.request import SamplingParams

MAX_TOKENS = 20
PROMPTS = [
    "Hi",
    "The capital of France is",
    "Write a haiku about the sea.",
    "List three prime numbers greater than ten and explain why each is prime.",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a kingdom far away, there lived a princess who loved to read books about "
    "dragons, castles and faraway lands. One day she found a mysterious map hidden in the library, and",
    "Translate to French: The weather is nice today and I would like to go for a walk in the park.",
    "Q: What is 17 times 3?\nA:",
]
SYSTEM = (
    "You are a concise assistant for a hardware store. You answer questions about tools, paint, "
    "plumbing and garden supplies in at most two sentences, and you never invent prices."
)
QUESTIONS = ["Which drill for concrete?", "How do I fix a dripping tap?", "Best paint for a bathroom?"]

pytestmark = pytest.mark.slow


def _hf_greedy(hf_model, token_ids: list[int], max_tokens: int) -> list[int]:
    with torch.inference_mode():
        out = hf_model.generate(
            torch.tensor([token_ids]), attention_mask=torch.ones(1, len(token_ids), dtype=torch.long),
            do_sample=False, max_new_tokens=max_tokens, eos_token_id=None, pad_token_id=0,
        )
    return out[0, len(token_ids):].tolist()


def _run(engine: LLMEngine, prompts: list[list[int]], max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), ids, params)
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = list(out.outputs[0].token_ids)
    assert engine.kv_manager.num_free_blocks == engine.runner.num_blocks - 1, "KV blocks leaked"
    return [finals[str(i)] for i in range(len(prompts))]


def _engine(loaded, **kw) -> LLMEngine:
    cache = {k: kw.pop(k) for k in list(kw) if k in CacheConfig.__dataclass_fields__}
    config = EngineConfig(
        model=ModelConfig(model="default", dtype="float32", device="cpu"),
        cache=CacheConfig(**cache),
        scheduler=SchedulerConfig(**kw),
    )
    return LLMEngine(config, loaded=loaded)


@pytest.fixture(scope="module")
def prompt_ids(smollm2_loaded) -> list[list[int]]:
    tok = smollm2_loaded.tokenizer
    return [tok.encode(p, add_special_tokens=False) for p in PROMPTS]


@pytest.fixture(scope="module")
def reference(hf_smollm2, prompt_ids) -> list[list[int]]:
    return [_hf_greedy(hf_smollm2, ids, MAX_TOKENS) for ids in prompt_ids]


def test_continuous_batching_matches_hf(smollm2_loaded, prompt_ids, reference):
    engine = _engine(smollm2_loaded)
    assert _run(engine, prompt_ids) == reference


def test_forced_preemption_matches_hf(smollm2_loaded, prompt_ids, reference):
    # 14 usable blocks of 8 tokens cannot hold 8 growing sequences: the scheduler must preempt.
    engine = _engine(smollm2_loaded, block_size=8, num_blocks=15)
    assert _run(engine, prompt_ids) == reference
    assert engine.scheduler.num_preemptions > 0


def test_chunked_prefill_matches_hf(smollm2_loaded, prompt_ids, reference):
    # A 7-token budget splits every longer prompt over several steps, mixed with decodes.
    engine = _engine(smollm2_loaded, max_num_batched_tokens=7, block_size=4)
    assert max(len(p) for p in prompt_ids) > 7 * 4
    assert _run(engine, prompt_ids) == reference


def test_static_batching_matches_hf(smollm2_loaded, prompt_ids, reference):
    engine = _engine(smollm2_loaded, mode="static", max_num_seqs=3)
    assert _run(engine, prompt_ids) == reference


def test_prefix_cache_hits_match_hf(smollm2_loaded, hf_smollm2):
    tok = smollm2_loaded.tokenizer
    prompts = [
        tok.apply_chat_template(
            [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
            tokenize=True, add_generation_prompt=True,
        )
        for q in QUESTIONS
    ]
    prompts = [list(p["input_ids"]) if isinstance(p, dict) or hasattr(p, "keys") else list(p) for p in prompts]
    expected = [_hf_greedy(hf_smollm2, ids, 12) for ids in prompts]
    engine = _engine(smollm2_loaded)
    # First request alone fills the cache; the others then hit the shared system-prompt blocks.
    first = _run(engine, prompts[:1], max_tokens=12)
    rest = _run(engine, prompts[1:], max_tokens=12)
    assert first + rest == expected
    stats = engine.kv_manager.prefix_cache_stats
    assert stats.hit_rate > 0.3, stats

"""Offline API: `LLM(model=...).generate(prompts, params)` runs a batch to completion.

All prompts are queued at once and the engine steps until every one finishes, so they are
batched continuously; results come back in prompt order as the final RequestOutput of each.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from shardserve.workers.config import SECTIONS, EngineConfig, ModelConfig, SpeculativeConfig
from shardserve.workers.engine import LLMEngine
from shardserve.workers.request import RequestOutput, SamplingParams
from tqdm.auto import tqdm

Prompt = str | Sequence[int]


class LLM:
    """Keyword arguments override fields of ModelConfig, CacheConfig, SchedulerConfig or
    ParallelConfig by name, e.g. `LLM("default", num_blocks=64, max_num_batched_tokens=32,
    mode="static")`, `LLM("/path/to/llama", tensor_parallel_size=2)` or `LLM(..., async_scheduling=True)`; speculative
    decoding as `LLM(..., speculative={"method": "ngram", "num_speculative_tokens": 4})`."""

    def __init__(self, model: str = "default", config: EngineConfig | None = None, progress: bool = False,
                 **overrides: object) -> None:
        config = config or EngineConfig(model=ModelConfig(model=model))
        config = _apply_overrides(config, overrides)
        self.engine = LLMEngine(config, progress=progress)
        self._next_id = 0

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        priorities: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = params or SamplingParams()
        params_list = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params_list) != len(prompts):
            raise ValueError(f"params must be one SamplingParams or one per prompt ({len(prompts)}), got {len(params_list)}")
        ids = []
        for i, (prompt, p) in enumerate(zip(prompts, params_list, strict=True)):
            request_id = str(self._next_id)
            self._next_id += 1
            p = p if p.final_only else replace(p, final_only=True)  # only final outputs are read
            self.engine.add_request(request_id, prompt, p, priority=priorities[i] if priorities else 0)
            ids.append(request_id)
        finals: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), disable=not use_tqdm, desc="generate") as bar:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        finals[out.request_id] = out
                        bar.update(1)
        return [finals[i] for i in ids]

    def score(self, prompt: Prompt, num_targets: int | None = None) -> torch.Tensor:
        """[num_targets, vocab_size] float32 log-probs of the prompt's own tokens (LLMEngine.score)."""
        return self.engine.score(prompt, num_targets)

    def chat(self, messages: list[dict[str, str]], params: SamplingParams | None = None) -> RequestOutput:
        prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.generate([prompt], params)[0]


def _apply_overrides(config: EngineConfig, overrides: dict[str, object]) -> EngineConfig:
    updates: dict[str, dict[str, object]] = {name: {} for name in SECTIONS}
    overrides = dict(overrides)
    speculative = overrides.pop("speculative", None)
    if speculative is not None:  # LLM(speculative={"method": "ngram", ...}): the YAML section's names
        if not isinstance(speculative, dict):
            raise ValueError(f"speculative must be a dict like {{'method': 'ngram'}}, got {speculative!r}")
        for key, value in speculative.items():
            name = "speculative_method" if key == "method" else key
            if name not in SpeculativeConfig.__dataclass_fields__:
                raise ValueError(f"unknown speculative option {key!r}")
            overrides.setdefault(name, value)
    for key, value in overrides.items():
        section = next((n for n, cls in SECTIONS.items() if key in cls.__dataclass_fields__), None)
        if section is None:
            raise ValueError(f"unknown LLM option {key!r}")
        updates[section][key] = value
    return replace(config, **{n: replace(getattr(config, n), **u) for n, u in updates.items() if u})

"""Seeded benchmark workloads: fixed lengths, or a ShareGPT-like lognormal distribution.

ShareGPT conversations have heavy-tailed prompt and reply lengths; a lognormal with medians
around 200 input / 180 output tokens and sigma 0.8 reproduces that shape (the distribution vLLM's
and our reference figures use). Lengths are clipped to [min_len, max_len] and prompts are
random token ids (the content does not change the speed of a dense model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int


@dataclass(frozen=True)
class Workload:
    """distribution: `fixed` (every request input_len / output_len) or `lognormal`
    (medians input_len / output_len, log-space std sigma)."""

    num_requests: int
    input_len: int
    output_len: int
    distribution: str = "fixed"
    sigma: float = 0.8
    min_len: int = 4
    max_len: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        if self.distribution not in ("fixed", "lognormal"):
            raise ValueError(f"distribution must be fixed or lognormal, got {self.distribution!r}")
        if self.num_requests < 1 or self.input_len < 1 or self.output_len < 1:
            raise ValueError("num_requests, input_len and output_len must be >= 1")

    def sample(self, vocab_size: int) -> list[BenchRequest]:
        rng = np.random.default_rng(self.seed)
        if self.distribution == "fixed":
            inputs = np.full(self.num_requests, self.input_len)
            outputs = np.full(self.num_requests, self.output_len)
        else:
            inputs = rng.lognormal(math.log(self.input_len), self.sigma, self.num_requests)
            outputs = rng.lognormal(math.log(self.output_len), self.sigma, self.num_requests)
        inputs = np.clip(np.round(inputs), self.min_len, self.max_len).astype(int)
        outputs = np.clip(np.round(outputs), 1, self.max_len).astype(int)
        # Stay clear of special ids at the bottom of the vocabulary.
        low = min(1000, vocab_size // 4)
        return [
            BenchRequest(rng.integers(low, vocab_size, int(n_in)).tolist(), int(n_out))
            for n_in, n_out in zip(inputs, outputs, strict=True)
        ]

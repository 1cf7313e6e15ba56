"""The requests a run sends: lognormal lengths (workers/bench/workload.py) or a JSONL file.

Data flow: `build_requests` returns one list of `ServeRequest`, built once per run from the seed,
so every endpoint and load point gets the very same lengths. A prompt of N tokens is made for an
endpoint whose tokenizer is unknown here, in one of two ways (`--prompt-format`):
  - `ids` (default): N random token ids in [min(1000, vocab/4), vocab_size) sent as the prompt
    itself — /v1/completions of vLLM and of shardserve take a list of ints as `prompt`, our gRPC
    takes `prompt_token_ids` — so the model sees exactly N tokens. `--vocab-size` must not exceed
    the served model's vocabulary (32,000 fits Llama 2/3, Mistral, Qwen, SmolLM2);
  - `text`: N words drawn from common English words that are one token each in the usual BPE
    vocabularies, so the server sees close to N tokens (its own count is recorded from usage).
A JSONL line is `{"prompt": "..." | [ids], "max_tokens": N}` or `{"input_len": N, "output_len": M}`;
a file with fewer lines than --num-requests is cycled. `fresh_prompts` redraws the drawn prompts'
content (same lengths) for each load point and endpoint, so no prefix cache hit skews a later one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from shardserve.workers.bench.workload import Workload

# Common English words that are single tokens (with their leading space) in GPT-2, Llama 3 and
# SentencePiece vocabularies alike.
WORDS = (
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by", "on",
    "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an", "had", "they",
    "you", "were", "their", "one", "all", "we", "can", "her", "has", "there", "been", "if", "more", "when",
    "will", "would", "who", "so", "no", "time", "people", "year", "way", "day", "man", "thing", "woman",
    "life", "child", "world", "school", "state", "family", "student", "group", "country", "problem",
    "hand", "part", "place", "case", "week", "company", "system", "program", "question", "work",
    "government", "number", "night", "point", "home", "water", "room", "mother", "area",
)


@dataclass(frozen=True)
class ServeRequest:
    """One request: the prompt (text, or token ids sent as-is), its requested input length in tokens
    (None for a text prompt from a file: the server's usage tells), the output length asked, and
    whether the prompt was drawn here (then `fresh_prompts` may redraw it) or given by the file."""

    prompt: str | list[int]
    input_len: int | None
    max_tokens: int
    drawn: bool = True


@dataclass(frozen=True)
class DatasetSpec:
    num_requests: int
    input_len: int = 200
    output_len: int = 180
    distribution: str = "lognormal"
    sigma: float = 0.8
    max_len: int = 2048
    prompt_format: str = "ids"
    vocab_size: int = 32000
    path: str | None = None
    seed: int = 0


class DatasetError(ValueError):
    """A dataset file that cannot be read; the message names the file and line."""


def _prompt(n: int, spec: DatasetSpec, rng: np.random.Generator) -> str | list[int]:
    if spec.prompt_format == "text":
        words = rng.choice(len(WORDS), n)
        return " ".join(WORDS[i] for i in words)
    low = min(1000, spec.vocab_size // 4)
    return rng.integers(low, spec.vocab_size, n).tolist()


def _positive_int(value: object, key: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DatasetError(f"{where}: {key} must be an integer >= 1, got {value!r}")
    return value


def _from_line(obj: object, spec: DatasetSpec, rng: np.random.Generator, where: str) -> ServeRequest:
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "prompt" in obj:
        prompt = obj["prompt"]
        max_tokens = _positive_int(obj.get("max_tokens"), "max_tokens", where)
        if isinstance(prompt, str) and prompt:
            return ServeRequest(prompt, None, max_tokens, drawn=False)
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and t >= 0 for t in prompt):
            return ServeRequest(list(prompt), len(prompt), max_tokens, drawn=False)
        raise DatasetError(f"{where}: prompt must be non-empty text or a list of token ids >= 0")
    if "input_len" in obj:
        input_len = _positive_int(obj["input_len"], "input_len", where)
        output_len = _positive_int(obj.get("output_len"), "output_len", where)
        return ServeRequest(_prompt(input_len, spec, rng), input_len, output_len)
    raise DatasetError(f"{where}: a line needs prompt + max_tokens, or input_len + output_len")


def _from_file(spec: DatasetSpec) -> list[ServeRequest]:
    path = Path(spec.path or "")
    try:
        lines = [(i, line) for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    except OSError as exc:
        raise DatasetError(f"cannot read dataset {path}: {exc.strerror or exc}") from exc
    if not lines:
        raise DatasetError(f"dataset {path} has no requests")
    rng = np.random.default_rng(spec.seed)
    requests = []
    for number, line in lines[: spec.num_requests]:
        where = f"{path}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{where}: not JSON ({exc.msg})") from exc
        requests.append(_from_line(obj, spec, rng, where))
    return [requests[i % len(requests)] for i in range(spec.num_requests)]


def build_requests(spec: DatasetSpec) -> list[ServeRequest]:
    """The run's requests, seeded: the file's, or `num_requests` drawn from the length distribution."""
    if spec.path is not None:
        return _from_file(spec)
    workload = Workload(spec.num_requests, spec.input_len, spec.output_len, spec.distribution, spec.sigma,
                        max_len=spec.max_len, seed=spec.seed)
    sampled = workload.sample(spec.vocab_size)  # lengths (and, for `ids`, the prompts) from one seed
    if spec.prompt_format == "ids":
        return [ServeRequest(r.prompt_token_ids, len(r.prompt_token_ids), r.output_len) for r in sampled]
    rng = np.random.default_rng(spec.seed + 1)
    return [ServeRequest(_prompt(len(r.prompt_token_ids), spec, rng), len(r.prompt_token_ids), r.output_len)
            for r in sampled]


def fresh_prompts(requests: list[ServeRequest], spec: DatasetSpec, salt: int) -> list[ServeRequest]:
    """The same lengths with newly drawn prompt content (seeded by the run's seed and `salt`), so a
    server's prefix cache never serves a prompt it saw at an earlier load point or on another endpoint
    of the same server; prompts given in a file are kept as they are."""
    rng = np.random.default_rng([spec.seed, salt])
    return [ServeRequest(_prompt(r.input_len, spec, rng), r.input_len, r.max_tokens) if r.drawn and r.input_len
            else r for r in requests]

"""Typed request boundary shared by the offline API, the engine and the servers.

Data flow: a caller builds `SamplingParams` (validated on construction: a bad field raises a
`ValueError` naming the field and its allowed range) and hands a prompt to the engine, which
wraps it in a mutable `Request` that lives inside the engine (scheduler state, output tokens,
timing). Each engine step turns the requests it advanced into immutable `RequestOutput`
snapshots: cumulative text/token ids plus the delta of this step, so a streaming server can
forward `new_text` and an offline caller can keep only the last snapshot.
"""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field
from typing import Any

# Values that mean "this filter is off".
TOP_K_DISABLED = 0


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the model's context length
    ABORT = "abort"  # the caller aborted (client gone, cancelled)
    ERROR = "error"  # the engine could not serve the request


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued, holds no KV blocks
    RUNNING = "running"  # holds KV blocks, scheduled each step
    PREEMPTED = "preempted"  # blocks taken back; back in the queue, will recompute
    FINISHED = "finished"


MAX_INT32 = 2**31 - 1  # bound of counts and token ids (no model has a context or vocab near it)
MIN_INT64, MAX_INT64 = -(2**63), 2**63 - 1  # seeds (gRPC's int64)
MAX_TEMPERATURE = 2.0  # OpenAI's range [0, 2]
MAX_REPETITION_PENALTY = 2.0  # (0, 2]: beyond 2 a seen token is all but banned
_MAX_ECHO_CHARS = 40


def _short(value: Any) -> str:
    """repr(value) cut to a few dozen characters: messages never echo a whole prompt or list."""
    text = repr(value)
    return text if len(text) <= _MAX_ECHO_CHARS else f"{text[: _MAX_ECHO_CHARS - 3]}..."


def _check_type(name: str, value: Any, types: tuple[type, ...], what: str) -> None:
    # bool is an int subclass: reject it where a number is expected.
    if isinstance(value, bool) and bool not in types:
        raise ValueError(f"{name} must be {what}, got {value!r}")
    if not isinstance(value, types):
        raise ValueError(f"{name} must be {what}, got {type(value).__name__} {_short(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} must be {what} (a finite number), got {_short(value)}")


def _check_range(name: str, value: float, low: float, high: float, what: str) -> None:
    if not low <= value <= high:
        raise ValueError(f"{name} must be {what}, got {_short(value)}")


def _is_valid_text(text: str) -> bool:
    """True unless `text` holds a lone surrogate (JSON's "\\ud800" parses to one; UTF-8 cannot encode it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one completion. Every field is validated on construction.

    Every number must be finite; the ranges below are OpenAI's where it has one (vLLM's names).
    temperature: in [0, 2]; 0 means greedy.
    top_k: keep the k most likely tokens; 0 (or -1) disables; else in [1, 2**31 - 1].
    top_p: keep the smallest set whose mass reaches top_p; in (0, 1].
    min_p: drop tokens whose probability is below min_p * max probability; in [0, 1].
    repetition_penalty: in (0, 2]; 1 disables (divides positive logits of seen tokens, prompt and
      output, multiplies negative ones — the CTRL/HF rule).
    presence_penalty, frequency_penalty: in [-2, 2]; applied to output tokens only (OpenAI rule).
    seed: per-request seed in the int64 range; the same seed gives the same tokens whatever else is batched.
    max_tokens: new tokens at most, in [1, 2**31 - 1]; the engine also stops at the model's context
      length (finish reason `length`). min_tokens: EOS and stop ids are masked until reached.
    stop: non-empty, valid Unicode strings that end the completion (left out of the text unless
      include_stop_str_in_output). Servers bound their count and length (config `limits`).
    stop_token_ids: token ids in [0, 2**31 - 1] that end the completion (in addition to EOS unless
      ignore_eos); the engine checks them against the vocabulary.
    n: completions per prompt, >= 1; they share the prompt's KV blocks through the prefix cache.
    logprobs: return the top-N logprobs of each sampled position (0 = only the sampled token).
    prompt_logprobs: return the top-N logprobs of each prompt position.
    final_only: report the request only once it has finished (offline batch use, as
      `LLM.generate` does): the engine then builds no per-step snapshot for it.
    """

    n: int = 1
    temperature: float = 1.0
    top_k: int = TOP_K_DISABLED
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    final_only: bool = False

    MAX_LOGPROBS = 20

    def __post_init__(self) -> None:
        num = (int, float)
        _check_type("n", self.n, (int,), "an integer >= 1")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {_short(self.n)}")
        _check_type("temperature", self.temperature, num, f"a number in [0, {MAX_TEMPERATURE:g}]")
        _check_range("temperature", self.temperature, 0, MAX_TEMPERATURE, f"in [0, {MAX_TEMPERATURE:g}]")
        _check_type("top_k", self.top_k, (int,), "an integer (0 or -1 disables, else >= 1)")
        if not -1 <= self.top_k <= MAX_INT32:
            raise ValueError(f"top_k must be -1, 0 (disabled) or in [1, {MAX_INT32}], got {_short(self.top_k)}")
        if self.top_k == -1:
            object.__setattr__(self, "top_k", TOP_K_DISABLED)
        _check_type("top_p", self.top_p, num, "a number in (0, 1]")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {_short(self.top_p)}")
        _check_type("min_p", self.min_p, num, "a number in [0, 1]")
        _check_range("min_p", self.min_p, 0, 1, "in [0, 1]")
        what = f"in (0, {MAX_REPETITION_PENALTY:g}]"
        _check_type("repetition_penalty", self.repetition_penalty, num, f"a number {what}")
        if not 0 < self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise ValueError(f"repetition_penalty must be {what}, got {_short(self.repetition_penalty)}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check_type(name, value, num, "a number in [-2, 2]")
            _check_range(name, value, -2, 2, "in [-2, 2]")
        if self.seed is not None:
            _check_type("seed", self.seed, (int,), "an integer or None")
            _check_range("seed", self.seed, MIN_INT64, MAX_INT64, f"in [{MIN_INT64}, {MAX_INT64}]")
        _check_type("max_tokens", self.max_tokens, (int,), "an integer >= 1")
        _check_range("max_tokens", self.max_tokens, 1, MAX_INT32, f"in [1, {MAX_INT32}]")
        _check_type("min_tokens", self.min_tokens, (int,), "an integer in [0, max_tokens]")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {_short(self.min_tokens)}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if not isinstance(self.stop, (tuple, list)) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {_short(self.stop)}")
        for i, text in enumerate(self.stop):
            if not _is_valid_text(text):
                raise ValueError(f"stop[{i}] must be valid Unicode text (it holds a lone surrogate)")
        object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.stop_token_ids, (tuple, list)) or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= MAX_INT32 for t in self.stop_token_ids
        ):
            raise ValueError(
                f"stop_token_ids must be a list of integers in [0, {MAX_INT32}], got {_short(self.stop_token_ids)}"
            )
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check_type(name, value, (int,), f"an integer in [0, {self.MAX_LOGPROBS}] or None")
                if not 0 <= value <= self.MAX_LOGPROBS:
                    raise ValueError(f"{name} must be in [0, {self.MAX_LOGPROBS}], got {_short(value)}")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            _check_type(name, getattr(self, name), (bool,), "a boolean")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def for_sample(self, index: int) -> SamplingParams:
        """Params of the index-th of n samples: n=1, and a distinct seed when seeded."""
        from dataclasses import replace

        seed = None if self.seed is None else self.seed + index
        if self.n == 1 and seed == self.seed:
            return self  # nothing would change (and it is frozen, so sharing it is safe)
        return replace(self, n=1, seed=seed)


@dataclass(frozen=True)
class Logprob:
    """Log-probability of one token id, with its rank (1 = most likely) and decoded text."""

    logprob: float
    rank: int
    decoded: str | None = None


# One position's logprobs: token id -> Logprob (the chosen token plus the top-N).
PositionLogprobs = dict[int, Logprob]


@dataclass
class RequestMetrics:
    """Wall-clock timestamps (time.monotonic seconds) of one request's life."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    inter_token_latencies: list[float] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache
    num_generation_tokens: int = 0
    num_preemptions: int = 0
    cost_usd: float = 0.0

    @property
    def ttft(self) -> float | None:
        """Time to first token: arrival until the first output token."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    def record_token(self, now: float) -> None:
        if self.first_token_time is None:
            self.first_token_time = now
        else:
            self.inter_token_latencies.append(now - self.last_token_time)
        self.last_token_time = now
        self.num_generation_tokens += 1


@dataclass(frozen=True)
class CompletionOutput:
    """One of a request's n completions: cumulative text and ids, plus this step's delta."""

    index: int
    text: str
    token_ids: tuple[int, ...]
    new_text: str
    new_token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or stop token id that matched
    logprobs: tuple[PositionLogprobs, ...] | None = None  # cumulative, one per output token

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class RequestOutput:
    """Snapshot of one request after an engine step (what the APIs yield).

    While streaming: `finished` is False and each completion's `new_text`/`new_token_ids`
    hold what this step added. At the end: `finished` is True and every completion has a
    finish_reason. On an engine error the completion's finish_reason is ERROR and `error`
    carries the message.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: tuple[int, ...]
    outputs: tuple[CompletionOutput, ...]
    finished: bool
    metrics: RequestMetrics | None = None
    prompt_logprobs: tuple[PositionLogprobs | None, ...] | None = None
    error: str | None = None


class Request:
    """A request inside the engine: one prompt and one completion (n > 1 becomes n of these).

    Token bookkeeping follows one rule: `all_token_ids = prompt + output`, and
    `num_computed_tokens` of them already have K/V in the cache. Each step the scheduler
    picks how many of the remaining tokens to compute; when it reaches the end of
    `all_token_ids`, the runner samples one new token.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_id: int | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
        prompt: str | None = None,
        parent_id: str | None = None,
        sample_index: int = 0,
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_id = eos_token_id
        self.priority = priority  # lower value = served first (vLLM's convention)
        self.parent_id = parent_id or request_id  # the user's id when n > 1
        self.sample_index = sample_index
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at first schedule
        self.status = RequestStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.stop_reason: str | int | None = None
        self.metrics = RequestMetrics(
            arrival_time=time.monotonic() if arrival_time is None else arrival_time,
            num_prompt_tokens=len(prompt_token_ids),
        )

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.value}, prompt={self.num_prompt_tokens}, "
            f"output={self.num_output_tokens}, computed={self.num_computed_tokens})"
        )

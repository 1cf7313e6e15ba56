"""EngineProtocol: the async contract between the serving layer (cluster/) and an engine.

`cluster/` only ever calls these methods, so a fake engine that honours them can test the
servers without a model, and the real `AsyncEngine` (workers/async_engine.py) plugs in
unchanged.

generate() yields `RequestOutput` snapshots:
  - while streaming: `finished` is False; each completion's `new_text` / `new_token_ids` hold
    what the step added (possibly empty text while a UTF-8 character or a possible stop string
    is held back);
  - at the end: exactly one snapshot with `finished` True and a finish_reason on every
    completion (stop, length or abort);
  - on bad input: raises `ValueError` naming the field and its allowed range *before* yielding
    anything (the request never entered the engine);
  - on an engine failure: raises `EngineDeadError`; other requests are failed the same way.
If the consumer stops iterating (client gone, task cancelled), the request is aborted and its
KV blocks are freed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from shardserve.workers.config import ResolvedCpuActivations
from shardserve.workers.cost import CostStats
from shardserve.workers.request import RequestOutput, SamplingParams
from shardserve.workers.spec.speculator import SpecDecodeStats


class EngineDeadError(RuntimeError):
    """The engine's step loop failed; it serves nothing more until restarted."""


class QueueFullError(RuntimeError):
    """The engine's waiting queue is at its configured limit (maps to HTTP 429 / RESOURCE_EXHAUSTED)."""


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of KV blocks in use, 0..1
    prefix_cache_hit_rate: float  # cached prompt tokens / prompt tokens looked up, 0..1
    num_preemptions: int  # since start
    prompt_tokens_per_s: float  # over the last stats interval
    generation_tokens_per_s: float
    num_finished: int  # since start
    total_prompt_tokens: int
    total_generation_tokens: int
    # Batches submitted and not yet applied (now, between steps), and the most ever (1 when synchronous).
    num_batches_in_flight: int = 0
    max_batches_in_flight: int = 0
    spec_decode: SpecDecodeStats | None = None  # speculative decoding totals (None when it is off)
    cost: CostStats | None = None  # measured cost (workers/cost.py); None without a price
    # ModelConfig.cpu_activations as resolved at start-up (`auto` -> float | int8); None: not reported
    cpu_activations: ResolvedCpuActivations | None = None


@dataclass(frozen=True)
class ModelInfo:
    name: str
    max_model_len: int
    vocab_size: int


@runtime_checkable
class EngineProtocol(Protocol):
    def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        request_id: str,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Text prompts are tokenized by the engine; a sequence of ints is used as token ids."""
        ...

    async def abort(self, request_id: str) -> None:
        """Abort a request (no-op for an unknown or finished id); its blocks return to the pool."""
        ...

    async def health(self) -> None:
        """Return if the engine can serve; raise EngineDeadError otherwise."""
        ...

    async def stats(self) -> EngineStats: ...

    def model_info(self) -> ModelInfo: ...

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render OpenAI-style chat messages with the model's chat template."""
        ...

"""SyntheticEngine: an LLMEngine stand-in with a GPU-like step time, driven by the real AsyncEngine.

Why it exists: to measure what the serving path (gRPC proxy → Ingress → LLMServer → AsyncEngine)
costs on a machine without a GPU, the engine must produce tokens at a GPU-like rate *and* hand
them over exactly as the real one does — a dedicated step thread that advances every running
request by one token per step and returns one batch of `RequestOutput`s (workers/async_engine.py
then posts that batch to the replica's event loop). FakeEngine (fake_engine.py) cannot show this:
it is an asyncio engine with one timer per request and no step thread.

A step holds the GIL for `host_s` (the engine's own Python: scheduling, output processing) and
releases it for `device_s` (waiting on the GPU or on the ranks of a worker group), split into
`num_syncs` alternations like a tensor-parallel driver that talks to its ranks several times per
step. So when the replica's event loop keeps the GIL busy, each re-acquire waits and the step
slows down — the contention the real engine sees, reproduced without a model.

Select it with `build_app(config, engine_factory=doubles.engine_factory(synthetic_engine))`
(benchmarks/serve_overhead.py); the timing comes from the section's `source`, e.g.
`synthetic:step_ms=20,host_ms=4,syncs=4`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from shardserve.workers.protocol import EngineStats, ModelInfo
from shardserve.workers.request import (
    CompletionOutput,
    FinishReason,
    RequestMetrics,
    RequestOutput,
    SamplingParams,
)

VOCAB_SIZE = 32_000


@dataclass(frozen=True)
class SyntheticTiming:
    """One step's wall time split into GIL-holding host work and GIL-free device waits."""

    step_s: float = 0.020
    host_s: float = 0.004
    num_syncs: int = 4

    @property
    def device_s(self) -> float:
        return max(0.0, self.step_s - self.host_s)

    @classmethod
    def parse(cls, source: str) -> SyntheticTiming:
        """`synthetic:step_ms=20,host_ms=4,syncs=4` (every key optional)."""
        spec = source.partition(":")[2]
        values: dict[str, float] = {}
        for item in filter(None, spec.split(",")):
            key, _, value = item.partition("=")
            values[key.strip()] = float(value)
        unknown = set(values) - {"step_ms", "host_ms", "syncs"}
        if unknown:
            raise ValueError(f"source: unknown synthetic engine keys {sorted(unknown)}")
        return cls(
            step_s=values.get("step_ms", cls.step_s * 1e3) / 1e3,
            host_s=values.get("host_ms", cls.host_s * 1e3) / 1e3,
            num_syncs=max(1, int(values.get("syncs", cls.num_syncs))),
        )


@dataclass
class _Running:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    metrics: RequestMetrics
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None


def _busy(seconds: float) -> None:
    """Spin in Python (holding the GIL, like interpreter work) for `seconds`."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class SyntheticEngine:
    """The subset of LLMEngine that AsyncEngine uses; every step advances all running requests."""

    def __init__(self, timing: SyntheticTiming, max_num_seqs: int = 256, max_queue_len: int = 1024,
                 max_model_len: int = 8192) -> None:
        self.timing = timing
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.config = SimpleNamespace(scheduler=SimpleNamespace(max_queue_len=max_queue_len))
        self.executor = SimpleNamespace(check_health=lambda: None)
        self.tokenizer = None
        self._waiting: list[_Running] = []
        self._running: dict[str, _Running] = {}
        self._aborted: list[_Running] = []
        self.num_steps = 0
        self.total_generation_tokens = 0
        self.total_prompt_tokens = 0
        self.num_finished = 0
        self.busy_s = 0.0  # wall time spent inside step()

    # ---- LLMEngine surface used by AsyncEngine -----------------------------------------

    def add_request(self, request_id: str, prompt: str | Sequence[int], params: SamplingParams,
                    priority: int = 0, arrival_time: float | None = None) -> None:
        if isinstance(prompt, str):
            token_ids = tuple(ord(c) % VOCAB_SIZE for c in prompt)
        else:
            token_ids = tuple(prompt)
        if not token_ids:
            raise ValueError("prompt must contain at least 1 token, got an empty prompt")
        if request_id in self._running or any(r.request_id == request_id for r in self._waiting):
            raise ValueError(f"request_id {request_id!r} is already in use")
        metrics = RequestMetrics(time.monotonic() if arrival_time is None else arrival_time,
                                 num_prompt_tokens=len(token_ids))
        self._waiting.append(_Running(request_id, token_ids, params, metrics))

    def abort_request(self, request_id: str) -> None:
        request = self._running.pop(request_id, None)
        if request is None:
            for i, waiting in enumerate(self._waiting):
                if waiting.request_id == request_id:
                    request = self._waiting.pop(i)
                    break
        if request is not None:
            request.finish_reason = FinishReason.ABORT
            self._aborted.append(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self._running or self._waiting or self._aborted)

    def num_waiting(self) -> int:
        return len(self._waiting)

    def step(self) -> list[RequestOutput]:
        start = time.monotonic()
        while self._waiting and len(self._running) < self.max_num_seqs:
            request = self._waiting.pop(0)
            request.metrics.first_scheduled_time = start
            self.total_prompt_tokens += len(request.prompt_token_ids)
            self._running[request.request_id] = request
        t = self.timing
        for _ in range(t.num_syncs):
            _busy(t.host_s / t.num_syncs)
            time.sleep(t.device_s / t.num_syncs)
        now = time.monotonic()
        outputs = [self._finish_aborted(r, now) for r in self._aborted]
        self._aborted.clear()
        for request in list(self._running.values()):
            outputs.append(self._advance(request, now))
        self.num_steps += 1
        self.busy_s += time.monotonic() - start
        return outputs

    def stats(self) -> EngineStats:
        elapsed = max(self.busy_s, 1e-9)
        return EngineStats(
            num_running=len(self._running), num_waiting=len(self._waiting), kv_cache_usage=0.0,
            prefix_cache_hit_rate=0.0, num_preemptions=0,
            prompt_tokens_per_s=self.total_prompt_tokens / elapsed,
            generation_tokens_per_s=self.total_generation_tokens / elapsed,
            num_finished=self.num_finished, total_prompt_tokens=self.total_prompt_tokens,
            total_generation_tokens=self.total_generation_tokens,
        )  # fmt: skip

    def model_info(self) -> ModelInfo:
        return ModelInfo("synthetic", self.max_model_len, VOCAB_SIZE)

    def shutdown(self) -> None:
        pass

    # ---- internals ---------------------------------------------------------------------

    def _advance(self, request: _Running, now: float) -> RequestOutput:
        token_id = (hash(request.prompt_token_ids) + 7919 * len(request.token_ids)) % VOCAB_SIZE
        new_text = f" w{token_id}"
        request.token_ids.append(token_id)
        request.text += new_text
        request.metrics.record_token(now)
        self.total_generation_tokens += 1
        if len(request.token_ids) >= request.params.max_tokens:
            request.finish_reason = FinishReason.LENGTH
            request.metrics.finished_time = now
            del self._running[request.request_id]
            self.num_finished += 1
        return self._snapshot(request, new_text, (token_id,))

    def _finish_aborted(self, request: _Running, now: float) -> RequestOutput:
        request.metrics.finished_time = now
        return self._snapshot(request, "", ())

    @staticmethod
    def _snapshot(request: _Running, new_text: str, new_ids: tuple[int, ...]) -> RequestOutput:
        completion = CompletionOutput(
            index=0, text=request.text, token_ids=tuple(request.token_ids), new_text=new_text,
            new_token_ids=new_ids, finish_reason=request.finish_reason,
        )  # fmt: skip
        return RequestOutput(
            request_id=request.request_id, prompt=None, prompt_token_ids=request.prompt_token_ids,
            outputs=(completion,), finished=request.finish_reason is not None, metrics=request.metrics,
        )  # fmt: skip


def from_model_section(section: Any) -> Any:
    """Engine factory: an AsyncEngine over a SyntheticEngine timed by `section.source`."""
    from shardserve.workers.async_engine import AsyncEngine

    engine = SyntheticEngine(
        SyntheticTiming.parse(section.source),
        max_num_seqs=section.scheduler.max_num_seqs,
        max_queue_len=section.scheduler.max_queue_len,
        max_model_len=section.max_model_len or 8192,
    )
    return AsyncEngine(engine)

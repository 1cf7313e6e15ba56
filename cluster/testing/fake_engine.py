"""FakeEngine: a small, real EngineProtocol implementation without a model, for cluster tests.

Data flow: `generate(prompt, params, request_id)` checks the prompt (non-empty, fits
max_model_len), "tokenizes" it one character per token, queues it (at most max_num_seqs run at
once, at most max_queue_len wait, else QueueFullError), takes KV blocks for the prompt from a
fixed pool (prefix-cache hits are counted by chained block hashes), then emits one deterministic
token per `token_delay_s` — token i of a prompt is the word `w<k>` with k derived from the
prompt's hash and i — taking a new block whenever a block fills. It stops at max_tokens
(LENGTH), at a stop string (STOP), or on abort (ABORT, either `abort(id)` or the consumer
closing the iterator); in every case the request's blocks go back to the pool. `debug_state()`
reports the blocks each live request holds and the ids that were aborted, so tests can prove
that cancellation frees everything.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from shardserve.workers.protocol import EngineDeadError, EngineStats, ModelInfo, QueueFullError
from shardserve.workers.request import (
    CompletionOutput,
    FinishReason,
    RequestMetrics,
    RequestOutput,
    SamplingParams,
)

VOCAB_SIZE = 1000


@dataclass
class _Live:
    num_blocks: int
    aborted: asyncio.Event = field(default_factory=asyncio.Event)


class FakeEngine:
    def __init__(
        self,
        name: str = "fake",
        max_model_len: int = 4096,
        block_size: int = 16,
        num_blocks: int = 4096,
        max_num_seqs: int = 256,
        max_queue_len: int = 1024,
        token_delay_s: float = 0.01,
    ) -> None:
        self.name = name
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_queue_len = max_queue_len
        self.token_delay_s = token_delay_s
        self._slots = asyncio.Semaphore(max_num_seqs)
        self._num_waiting = 0
        self._live: dict[str, _Live] = {}
        self._free_blocks = num_blocks
        self._seen_blocks: set[str] = set()
        self._aborted: list[str] = []
        self._dead = False
        self._num_finished = 0
        self._prompt_tokens = 0
        self._cached_prompt_tokens = 0
        self._generation_tokens = 0
        self._started = time.monotonic()

    # ---- EngineProtocol -------------------------------------------------------------------
    async def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams,
        request_id: str,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        if self._dead:
            raise EngineDeadError("fake engine was killed")
        token_ids = self._tokenize(prompt)
        if request_id in self._live:
            raise ValueError(f"request_id must be unique among running requests, {request_id!r} is running")
        if params.n != 1:
            raise ValueError(f"n must be 1 for the fake engine, got {params.n}")
        if self._num_waiting >= self.max_queue_len:
            raise QueueFullError(f"waiting queue is full ({self.max_queue_len} requests, scheduler.max_queue_len)")
        metrics = RequestMetrics(arrival_time=time.monotonic(), num_prompt_tokens=len(token_ids))
        self._num_waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._num_waiting -= 1
        run = self._run(prompt, token_ids, params, request_id, metrics)
        try:
            async for out in run:
                yield out
        finally:
            await run.aclose()  # frees the blocks now, not when the generator is collected
            self._slots.release()

    async def abort(self, request_id: str) -> None:
        live = self._live.get(request_id)
        if live is not None:
            live.aborted.set()

    async def health(self) -> None:
        if self._dead:
            raise EngineDeadError("fake engine was killed")

    async def stats(self) -> EngineStats:
        elapsed = max(time.monotonic() - self._started, 1e-6)
        return EngineStats(
            num_running=len(self._live),
            num_waiting=self._num_waiting,
            kv_cache_usage=(self.num_blocks - self._free_blocks) / self.num_blocks,
            prefix_cache_hit_rate=self._cached_prompt_tokens / max(self._prompt_tokens, 1),
            num_preemptions=0,
            prompt_tokens_per_s=self._prompt_tokens / elapsed,
            generation_tokens_per_s=self._generation_tokens / elapsed,
            num_finished=self._num_finished,
            total_prompt_tokens=self._prompt_tokens,
            total_generation_tokens=self._generation_tokens,
        )

    def model_info(self) -> ModelInfo:
        return ModelInfo(name=self.name, max_model_len=self.max_model_len, vocab_size=VOCAB_SIZE)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        for i, message in enumerate(messages):
            if message.get("role") not in ("system", "user", "assistant"):
                raise ValueError(f"messages[{i}].role must be system, user or assistant, got {message.get('role')!r}")
        text = "".join(f"<|{m['role']}|>{m.get('content', '')}\n" for m in messages)
        return text + ("<|assistant|>" if add_generation_prompt else "")

    # ---- test hooks -----------------------------------------------------------------------
    def debug_state(self) -> dict[str, Any]:
        return {
            "held_blocks": {rid: live.num_blocks for rid, live in self._live.items()},
            "num_free_blocks": self._free_blocks,
            "num_blocks": self.num_blocks,
            "aborted": list(self._aborted),
            "num_finished": self._num_finished,
        }

    def kill(self) -> None:
        self._dead = True

    # ---- internals ------------------------------------------------------------------------
    def _tokenize(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            token_ids = [ord(c) % VOCAB_SIZE for c in prompt]
        else:
            token_ids = list(prompt)
            if any(not isinstance(t, int) or not 0 <= t < VOCAB_SIZE for t in token_ids):
                raise ValueError(f"prompt token ids must be integers in [0, {VOCAB_SIZE})")
        if not token_ids:
            raise ValueError("prompt must be non-empty")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt must be shorter than max_model_len={self.max_model_len} tokens, got {len(token_ids)}"
            )
        return token_ids

    def _take_blocks(self, n: int) -> None:
        if n > self._free_blocks:
            raise QueueFullError(f"KV cache is full ({self.num_blocks} blocks)")
        self._free_blocks -= n

    def _count_prefix_hits(self, token_ids: list[int]) -> int:
        chain, cached, hit = "", 0, True
        for start in range(0, len(token_ids) - self.block_size + 1, self.block_size):
            chain = hashlib.sha1((chain + repr(token_ids[start : start + self.block_size])).encode()).hexdigest()
            if hit and chain in self._seen_blocks:
                cached += self.block_size
            else:
                hit = False
            self._seen_blocks.add(chain)
        return cached

    async def _run(
        self,
        prompt: str | Sequence[int],
        token_ids: list[int],
        params: SamplingParams,
        request_id: str,
        metrics: RequestMetrics,
    ) -> AsyncIterator[RequestOutput]:
        self._take_blocks(-(-len(token_ids) // self.block_size))
        live = self._live[request_id] = _Live(num_blocks=-(-len(token_ids) // self.block_size))
        live_blocks = live.num_blocks
        metrics.num_cached_prompt_tokens = self._count_prefix_hits(token_ids)
        self._prompt_tokens += len(token_ids)
        self._cached_prompt_tokens += metrics.num_cached_prompt_tokens
        seed = int(hashlib.sha1(repr(token_ids).encode()).hexdigest()[:8], 16) + (params.seed or 0)
        text, out_ids, reason, stop_reason = "", [], None, None
        try:
            while reason is None:
                try:
                    await asyncio.wait_for(live.aborted.wait(), timeout=self.token_delay_s)
                    reason = FinishReason.ABORT
                    new_text, new_ids = "", ()
                except asyncio.TimeoutError:
                    k = (seed + 7919 * len(out_ids)) % VOCAB_SIZE
                    new_ids, new_text = (k,), f" w{k}"
                    if len(token_ids) + len(out_ids) + 1 > live_blocks * self.block_size:
                        self._take_blocks(1)
                        live_blocks = live.num_blocks = live_blocks + 1
                    out_ids.append(k)
                    self._generation_tokens += 1
                    metrics.record_token(time.monotonic())
                    for stop in params.stop:
                        if stop in text + new_text:
                            cut = (text + new_text).index(stop)
                            new_text, reason, stop_reason = (text + new_text)[len(text) : cut], FinishReason.STOP, stop
                            break
                    if reason is None and len(out_ids) >= params.max_tokens:
                        reason = FinishReason.LENGTH
                    if reason is None and len(token_ids) + len(out_ids) >= self.max_model_len:
                        reason = FinishReason.LENGTH
                text += new_text
                completion = CompletionOutput(
                    index=0,
                    text=text,
                    token_ids=tuple(out_ids),
                    new_text=new_text,
                    new_token_ids=tuple(new_ids),
                    finish_reason=reason,
                    stop_reason=stop_reason,
                )
                if reason is not None:
                    metrics.finished_time = time.monotonic()
                yield RequestOutput(
                    request_id=request_id,
                    prompt=prompt if isinstance(prompt, str) else None,
                    prompt_token_ids=tuple(token_ids),
                    outputs=(completion,),
                    finished=reason is not None,
                    metrics=metrics,
                )
        finally:
            if reason is None or reason == FinishReason.ABORT:
                self._aborted.append(request_id)
            else:
                self._num_finished += 1
            self._free_blocks += self._live.pop(request_id).num_blocks


def from_model_section(section: Any) -> FakeEngine:
    """Engine factory for `engine_factory: shardserve.cluster.testing.fake_engine:from_model_section`."""
    return FakeEngine(
        name=section.name,
        max_model_len=section.max_model_len or 4096,
        block_size=section.cache.block_size,
        max_num_seqs=section.scheduler.max_num_seqs,
        max_queue_len=section.scheduler.max_queue_len,
    )

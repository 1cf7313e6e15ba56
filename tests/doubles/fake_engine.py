"""FakeEngine: a small, real EngineProtocol implementation without a model, for cluster tests.

Data flow: `generate(prompt, params, request_id)` checks the prompt (non-empty, fits
max_model_len), "tokenizes" it one character per token, queues it (at most max_num_seqs run at
once, at most max_queue_len wait, else QueueFullError), takes KV blocks for the prompt from a
fixed pool (prefix-cache hits are counted by chained block hashes), then emits one deterministic
token per `token_delay_s` for each of the `n` samples — token i of sample s is the word `w<k>`
with k derived from the prompt's hash, the seed, s and i — taking a new block whenever a sample's
block fills. With `logprobs` / `prompt_logprobs` set, each position gets `fake_logprobs(...)`, a
deterministic rule tests can recompute. A sample stops at max_tokens (LENGTH), at a stop string
(STOP), or on abort (ABORT, either `abort(id)` or the consumer closing the iterator); in every
case the request's blocks go back to the pool. `kill()` makes running and new requests raise
EngineDeadError. `debug_state()` reports the blocks each live request holds, the ids that were
aborted or finished, and the SamplingParams each request arrived with, so tests can prove that
cancellation frees everything and that API fields reach the engine.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from shardserve.workers.protocol import EngineDeadError, EngineStats, ModelInfo, QueueFullError
from shardserve.workers.request import (
    CompletionOutput,
    FinishReason,
    Logprob,
    PositionLogprobs,
    RequestMetrics,
    RequestOutput,
    SamplingParams,
)

VOCAB_SIZE = 1000


SAMPLE_SEED_STRIDE = 104729  # sample i of n starts from seed + i * stride
NUM_RECENT = 256  # finished ids and params kept for debug_state()


def decode_output_token(token_id: int) -> str:
    """The text of a generated token: token k reads ` w<k>`."""
    return f" w{token_id}"


def fake_logprobs(token_id: int, num: int, decode: Callable[[int], str]) -> PositionLogprobs:
    """Deterministic logprobs of one position: the chosen token plus the top-`num` (rank order).

    The chosen token ranks 1 + token_id % 3, so it is sometimes not the most likely one and,
    with num < 3, sometimes outside the top-num (then it is reported with its own rank).
    Rank r has logprob -0.25 * r - (token_id % 7) / 100.
    """
    chosen_rank = 1 + token_id % 3
    others = iter((token_id + 1 + 37 * j) % VOCAB_SIZE for j in range(num + 1))
    entries: PositionLogprobs = {}
    for rank in range(1, max(num, chosen_rank) + 1):
        if rank == chosen_rank:
            tid = token_id
        elif rank <= num:
            tid = next(others)
        else:
            continue
        entries[tid] = Logprob(-0.25 * rank - (token_id % 7) / 100, rank, decode(tid))
    return entries


@dataclass
class _Live:
    num_blocks: int  # prompt blocks + every sample's output blocks
    num_prompt_blocks: int = 0
    aborted: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class _Sample:
    """One of a request's n completions while it runs."""

    seed: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    num_blocks: int = 0  # output blocks beyond the shared prompt blocks
    reason: FinishReason | None = None
    stop_reason: str | None = None

    def output(self, index: int, new_text: str, new_ids: tuple[int, ...]) -> CompletionOutput:
        return CompletionOutput(
            index=index,
            text=self.text,
            token_ids=tuple(self.token_ids),
            new_text=new_text,
            new_token_ids=new_ids,
            finish_reason=self.reason,
            stop_reason=self.stop_reason,
            logprobs=tuple(self.logprobs) if self.logprobs else None,
        )


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
        self._finished: collections.deque[str] = collections.deque(maxlen=NUM_RECENT)
        self._params: dict[str, SamplingParams] = {}
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
        if self._num_waiting >= self.max_queue_len:
            raise QueueFullError(f"waiting queue is full ({self.max_queue_len} requests, scheduler.max_queue_len)")
        metrics = RequestMetrics(arrival_time=time.monotonic(), num_prompt_tokens=len(token_ids))
        self._params[request_id] = params
        while len(self._params) > NUM_RECENT:
            del self._params[next(iter(self._params))]
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
            "finished": list(self._finished),
            "params": {rid: asdict(p) for rid, p in self._params.items()},
        }

    def kill(self) -> None:
        """Fail like a dead engine: running requests raise EngineDeadError, new ones too."""
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
        num_prompt_blocks = -(-len(token_ids) // self.block_size)
        self._take_blocks(num_prompt_blocks)
        live = self._live[request_id] = _Live(num_blocks=num_prompt_blocks, num_prompt_blocks=num_prompt_blocks)
        metrics.num_cached_prompt_tokens = self._count_prefix_hits(token_ids)
        self._prompt_tokens += len(token_ids)
        self._cached_prompt_tokens += metrics.num_cached_prompt_tokens
        base = int(hashlib.sha1(repr(token_ids).encode()).hexdigest()[:8], 16) + (params.seed or 0)
        samples = [_Sample(seed=base + SAMPLE_SEED_STRIDE * i) for i in range(params.n)]
        prompt_logprobs = None
        if params.prompt_logprobs is not None:
            prompt_logprobs = (None,) + tuple(
                fake_logprobs(t, params.prompt_logprobs, chr) for t in token_ids[1:]
            )
        aborted = False
        try:
            while not all(s.reason is not None for s in samples):
                try:
                    await asyncio.wait_for(live.aborted.wait(), timeout=self.token_delay_s)
                    aborted = True
                except asyncio.TimeoutError:
                    pass
                if self._dead:
                    raise EngineDeadError("fake engine was killed")
                completions = []
                for index, sample in enumerate(samples):
                    new_text, new_ids = "", ()
                    if sample.reason is None and aborted:
                        sample.reason = FinishReason.ABORT
                    elif sample.reason is None:
                        new_text, new_ids = self._step(sample, token_ids, params, live)
                        metrics.record_token(time.monotonic())
                    completions.append(sample.output(index, new_text, new_ids))
                finished = all(s.reason is not None for s in samples)
                if finished:
                    metrics.finished_time = time.monotonic()
                yield RequestOutput(
                    request_id=request_id,
                    prompt=prompt if isinstance(prompt, str) else None,
                    prompt_token_ids=tuple(token_ids),
                    outputs=tuple(completions),
                    finished=finished,
                    metrics=metrics,
                    prompt_logprobs=prompt_logprobs,
                )
        finally:
            if all(s.reason not in (None, FinishReason.ABORT) for s in samples):
                self._num_finished += 1
                self._finished.append(request_id)
            else:
                self._aborted.append(request_id)
            self._free_blocks += self._live.pop(request_id).num_blocks

    def _step(
        self, sample: _Sample, token_ids: list[int], params: SamplingParams, live: _Live
    ) -> tuple[str, tuple[int, ...]]:
        """One new token of one sample: take a block if it needs one, check stop and length."""
        k = (sample.seed + 7919 * len(sample.token_ids)) % VOCAB_SIZE
        new_text = decode_output_token(k)
        if len(token_ids) + len(sample.token_ids) + 1 > (sample.num_blocks + live.num_prompt_blocks) * self.block_size:
            self._take_blocks(1)
            sample.num_blocks += 1
            live.num_blocks += 1
        sample.token_ids.append(k)
        if params.logprobs is not None:
            sample.logprobs.append(fake_logprobs(k, params.logprobs, decode_output_token))
        self._generation_tokens += 1
        for stop in params.stop:
            if stop in sample.text + new_text:
                cut = (sample.text + new_text).index(stop)
                new_text = (sample.text + new_text)[len(sample.text) : cut]
                sample.reason, sample.stop_reason = FinishReason.STOP, stop
                break
        if sample.reason is None and len(sample.token_ids) >= params.max_tokens:
            sample.reason = FinishReason.LENGTH
        if sample.reason is None and len(token_ids) + len(sample.token_ids) >= self.max_model_len:
            sample.reason = FinishReason.LENGTH
        sample.text += new_text
        return new_text, (k,)


def from_model_section(section: Any) -> FakeEngine:
    """Engine factory: `build_app(config, engine_factory=doubles.engine_factory(fake_engine))`."""
    max_model_len = section.max_model_len or 4096
    return FakeEngine(
        name=section.name,
        max_model_len=max_model_len,
        block_size=section.cache.block_size,
        num_blocks=max(4096, 2 * -(-max_model_len // section.cache.block_size)),
        max_num_seqs=section.scheduler.max_num_seqs,
        max_queue_len=section.scheduler.max_queue_len,
    )

"""Typed messages between the Ingress deployment and the LLMServer deployments.

Data flow: an ingress (HTTP or gRPC) turns a client request into a `GenerateRequest` (prompt or
chat messages plus validated `SamplingParams`) and calls `LLMServer.generate` through a
DeploymentHandle; the prefix-affinity router reads `routing_text` to pick a replica. The replica
streams back `GenerateChunk`s: each carries the text/token delta of one engine step, the id of
the replica that served it, the logprobs of the new tokens when the request asked for them, and —
on the last chunk — finish reasons and token counts. A request that fails comes back as one chunk
whose `error` says why (`ErrorKind` maps to HTTP / gRPC status codes in cluster/ingress/errors.py),
so no exception has to survive pickling across Ray. `ChunkBuilder` is the one place that turns an
engine `RequestOutput` into a `GenerateChunk` (the LLMServer keeps one per request).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from shardserve.workers.request import CompletionOutput, PositionLogprobs, RequestOutput, SamplingParams

# The router hashes at most this many leading characters of a prompt.
ROUTING_PREFIX_CHARS = 4096


class ErrorKind(str, enum.Enum):
    INVALID_ARGUMENT = "invalid_argument"  # HTTP 400 / INVALID_ARGUMENT
    NOT_FOUND = "not_found"  # HTTP 404 / NOT_FOUND
    UNAUTHENTICATED = "invalid_api_key"  # HTTP 401 / UNAUTHENTICATED (OpenAI's error code)
    QUEUE_FULL = "queue_full"  # HTTP 429 / RESOURCE_EXHAUSTED
    RATE_LIMITED = "rate_limit_exceeded"  # HTTP 429 / RESOURCE_EXHAUSTED (an API key's own limit)
    UNAVAILABLE = "unavailable"  # HTTP 503 / UNAVAILABLE
    INTERNAL = "internal"  # HTTP 500 / INTERNAL


@dataclass(frozen=True)
class ErrorInfo:
    kind: ErrorKind
    message: str
    param: str | None = None  # the request field at fault, when known


@dataclass(frozen=True)
class GenerateRequest:
    request_id: str
    model: str
    params: SamplingParams
    prompt: str | tuple[int, ...] | None = None
    messages: tuple[tuple[str, str], ...] | None = None  # (role, content) pairs, rendered by the engine
    priority: int = 0
    tenant: str | None = None  # name of the API key that sent it (metrics, cost); None on an open API
    user: str | None = None  # the OpenAI `user` field: the metrics' tenant label on an open API
    # Wall-clock time (time.time()) the Ingress built it: a replica that was not ready yet then
    # reports the wait as a cold start (cluster/metrics/replica.py).
    arrival_unix_s: float = field(default_factory=time.time)
    # Wall-clock stamps taken on the way to the replica (the router's pick: "routed"), for the
    # LLMServer's per-hop trace (cluster/server.py); the one mutable part, never compared.
    stamps: dict[str, float] = field(default_factory=dict, compare=False, repr=False)

    @property
    def routing_text(self) -> str:
        """The leading text the router hashes for prefix affinity."""
        if self.messages is not None:
            text = "".join(f"<{role}>{content}" for role, content in self.messages)
        elif isinstance(self.prompt, str):
            text = self.prompt
        else:
            text = ",".join(map(str, self.prompt or ()))
        return text[:ROUTING_PREFIX_CHARS]


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token at this position
    text: str  # the token decoded on its own ("" when the engine has no tokenizer)


@dataclass(frozen=True)
class PositionLogprob:
    """One position: the token that was sampled (or given, in a prompt) and what the engine ranked.

    `candidates` holds every entry the engine reported, by rank: the top-N the request asked
    for, plus the chosen token when it ranked below N. Front ends keep those with rank <= N.
    """

    token: TokenLogprob
    candidates: tuple[TokenLogprob, ...]

    def top(self, num: int) -> tuple[TokenLogprob, ...]:
        return tuple(c for c in self.candidates if c.rank <= num)


@dataclass(frozen=True)
class CompletionDelta:
    index: int
    text: str
    num_tokens: int
    finish_reason: str | None = None  # FinishReason value on the completion's last delta
    logprobs: tuple[PositionLogprob, ...] | None = None  # one per new token, when params.logprobs is set


@dataclass(frozen=True)
class GenerateChunk:
    request_id: str
    replica_id: str
    deltas: tuple[CompletionDelta, ...] = ()
    finished: bool = False
    num_prompt_tokens: int = 0
    num_cached_prompt_tokens: int = 0
    error: ErrorInfo | None = None
    # On the first chunk when params.prompt_logprobs is set: one per prompt token, None for the first.
    prompt_logprobs: tuple[PositionLogprob | None, ...] | None = None
    cost_usd: float | None = None  # on the final chunk of a priced engine: the request's measured cost


def position_logprob(token_id: int, entries: PositionLogprobs) -> PositionLogprob:
    """The engine's {token_id: Logprob} of one position, as a picklable message."""
    ranked = sorted(
        (TokenLogprob(tid, lp.logprob, lp.rank, lp.decoded or "") for tid, lp in entries.items()),
        key=lambda t: (t.rank, t.token_id),
    )
    chosen = next((t for t in ranked if t.token_id == token_id), None)
    if chosen is None:  # an engine that left the chosen token out: report it unranked
        chosen = TokenLogprob(token_id, float("-inf"), len(ranked) + 1, "")
    return PositionLogprob(chosen, tuple(ranked))


class ChunkBuilder:
    """Turns one request's `RequestOutput` snapshots into `GenerateChunk`s (kept per request).

    Completion logprobs in a RequestOutput are cumulative; a chunk carries those of the tokens
    new in this step. Prompt logprobs go out once, on the first chunk that has them.
    """

    def __init__(self, request_id: str, replica_id: str, priced: bool = False) -> None:
        self.request_id = request_id
        self.replica_id = replica_id
        self.priced = priced  # the engine has a price (cost config): the final chunk carries cost_usd
        self._sent_prompt_logprobs = False

    def build(self, out: RequestOutput) -> GenerateChunk:
        prompt_logprobs = None
        if out.prompt_logprobs is not None and not self._sent_prompt_logprobs:
            self._sent_prompt_logprobs = True
            prompt_logprobs = tuple(
                None if entries is None else position_logprob(token_id, entries)
                for token_id, entries in zip(out.prompt_token_ids, out.prompt_logprobs, strict=False)
            )
        metrics = out.metrics
        return GenerateChunk(
            request_id=self.request_id,
            replica_id=self.replica_id,
            deltas=tuple(_delta(c) for c in out.outputs),
            finished=out.finished,
            num_prompt_tokens=len(out.prompt_token_ids),
            num_cached_prompt_tokens=0 if metrics is None else metrics.num_cached_prompt_tokens,
            error=None if out.error is None else ErrorInfo(ErrorKind.INTERNAL, out.error),
            prompt_logprobs=prompt_logprobs,
            cost_usd=metrics.cost_usd if self.priced and out.finished and metrics is not None else None,
        )


def _delta(c: CompletionOutput) -> CompletionDelta:
    logprobs = None
    if c.logprobs is not None:
        start = len(c.token_ids) - len(c.new_token_ids)
        entries = c.logprobs[start : start + len(c.new_token_ids)]
        logprobs = tuple(
            position_logprob(tid, e) for tid, e in zip(c.new_token_ids, entries, strict=False) if e is not None
        )
    return CompletionDelta(
        index=c.index,
        text=c.new_text,
        num_tokens=len(c.new_token_ids),
        finish_reason=None if c.finish_reason is None else c.finish_reason.value,
        logprobs=logprobs,
    )

"""Typed messages between the Ingress deployment and the LLMServer deployments.

Data flow: an ingress (HTTP or gRPC) turns a client request into a `GenerateRequest` (prompt or
chat messages plus validated `SamplingParams`) and calls `LLMServer.generate` through a
DeploymentHandle; the prefix-affinity router reads `routing_text` to pick a replica. The replica
streams back `GenerateChunk`s: each carries the text/token delta of one engine step, the id of
the replica that served it, and — on the last chunk — finish reasons and token counts. A request
that fails comes back as one chunk whose `error` says why (`ErrorKind` maps to HTTP / gRPC status
codes in cluster/ingress/errors.py), so no exception has to survive pickling across Ray.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from shardserve.workers.request import SamplingParams

# The router hashes at most this many leading characters of a prompt.
ROUTING_PREFIX_CHARS = 4096


class ErrorKind(str, enum.Enum):
    INVALID_ARGUMENT = "invalid_argument"  # HTTP 400 / INVALID_ARGUMENT
    NOT_FOUND = "not_found"  # HTTP 404 / NOT_FOUND
    QUEUE_FULL = "queue_full"  # HTTP 429 / RESOURCE_EXHAUSTED
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
class CompletionDelta:
    index: int
    text: str
    num_tokens: int
    finish_reason: str | None = None  # FinishReason value on the completion's last delta


@dataclass(frozen=True)
class GenerateChunk:
    request_id: str
    replica_id: str
    deltas: tuple[CompletionDelta, ...] = ()
    finished: bool = False
    num_prompt_tokens: int = 0
    num_cached_prompt_tokens: int = 0
    error: ErrorInfo | None = None

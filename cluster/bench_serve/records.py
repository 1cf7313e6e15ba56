"""What one request's run looked like, timed on the client: the raw data every figure comes from.

Clients (clients.py) fill a `RequestRecord` per request: when it was sent (seconds after the load
point started), when each streamed message with new tokens arrived (seconds after the send), how
many tokens each carried where the protocol says (our gRPC: `num_tokens`; OpenAI HTTP does not,
so None), and the server's own token counts from its usage. TTFT is the first such message,
e2e the end of the stream; inter-token latencies (ITL) are the gaps between messages divided by
the tokens the later one carried — over HTTP, spread evenly: (output tokens - 1) / (messages - 1),
one latency per event then, exact when a server streams one token per event, as vLLM does by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shardserve.cluster.bench_serve.arrivals import LoadPoint


@dataclass
class RequestRecord:
    index: int
    input_len: int | None  # tokens asked for (None: a text prompt from a file)
    max_tokens: int
    send_s: float = 0.0  # seconds after the load point started
    chunk_times_s: list[float] = field(default_factory=list)  # each message with new tokens, after the send
    chunk_tokens: list[int] | None = None  # tokens per message, where the protocol says
    e2e_s: float | None = None  # end of the stream, after the send
    prompt_tokens: int | None = None  # the server's count (usage)
    output_tokens: int = 0  # the server's count (usage), else the messages
    finish_reason: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.e2e_s is not None and bool(self.chunk_times_s)

    @property
    def ttft_s(self) -> float | None:
        return self.chunk_times_s[0] if self.chunk_times_s else None

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first: (e2e - TTFT) / (output tokens - 1)."""
        if not self.ok or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def itl_s(self) -> list[float]:
        """One inter-token latency per output token after the first (see the module docstring)."""
        times = self.chunk_times_s
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        if not gaps:
            return []
        if self.chunk_tokens is not None:  # n tokens in a message: n latencies of gap / n
            return [gap / n for gap, n in zip(gaps, self.chunk_tokens[1:], strict=True) for _ in range(n)]
        per_message = max(self.output_tokens - 1, len(gaps)) / len(gaps)
        return [gap / per_message for gap in gaps]

    def to_json(self) -> dict:
        return {
            "index": self.index, "input_len": self.input_len, "max_tokens": self.max_tokens,
            "prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens, "ok": self.ok,
            "error": self.error, "finish_reason": self.finish_reason, "send_s": self.send_s,
            "ttft_s": self.ttft_s, "e2e_s": self.e2e_s, "tpot_s": self.tpot_s, "itl_s": self.itl_s(),
            "chunk_times_s": self.chunk_times_s, "chunk_tokens": self.chunk_tokens,
        }


@dataclass
class PointResult:
    """Every record of one load point on one endpoint; duration from its start to its last request's end."""

    endpoint: str
    point: LoadPoint
    duration_s: float
    records: list[RequestRecord]

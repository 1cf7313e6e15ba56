"""OpenAI JSON shapes of token logprobs, built from the `PositionLogprob`s a GenerateChunk carries.

Data flow: the LLMServer sends, per new token, the sampled token and the engine's ranked
candidates (`messages.PositionLogprob`). The HTTP front end keeps the top-N the request asked
for and renders them here: the legacy /v1/completions shape (`tokens`, `token_logprobs`,
`top_logprobs`, `text_offset`, with offsets continuing across streamed chunks) or the chat shape
(`content: [{token, logprob, bytes, top_logprobs: [...]}]`), and vLLM's `prompt_logprobs` list.
JSON has no -inf, so a logprob below -9999 is written as -9999 (vLLM does the same).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shardserve.cluster.messages import PositionLogprob, TokenLogprob

MIN_LOGPROB = -9999.0


def finite(logprob: float) -> float:
    return logprob if logprob > MIN_LOGPROB else MIN_LOGPROB


def completion_logprobs(positions: Sequence[PositionLogprob], num: int, offset: int) -> dict[str, Any]:
    """Legacy completions logprobs of `positions`; `offset` is where the first token's text starts."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for p in positions:
        tokens.append(p.token.text)
        token_logprobs.append(finite(p.token.logprob))
        top = {c.text: finite(c.logprob) for c in p.top(num)}
        top.setdefault(p.token.text, finite(p.token.logprob))  # the sampled token is always listed
        top_logprobs.append(top)
        text_offset.append(offset)
        offset += len(p.token.text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": text_offset}


def _chat_token(t: TokenLogprob) -> dict[str, Any]:
    return {"token": t.text, "logprob": finite(t.logprob), "bytes": list(t.text.encode())}


def chat_logprobs(positions: Sequence[PositionLogprob], num: int) -> dict[str, Any]:
    content = [{**_chat_token(p.token), "top_logprobs": [_chat_token(c) for c in p.top(num)]} for p in positions]
    return {"content": content}


def prompt_logprobs(positions: Sequence[PositionLogprob | None], num: int) -> list[dict[str, Any] | None]:
    """vLLM's `prompt_logprobs`: per prompt token (None for the first), {token_id: {logprob, rank, decoded_token}}."""
    out: list[dict[str, Any] | None] = []
    for p in positions:
        if p is None:
            out.append(None)
            continue
        entries = {**{c.token_id: c for c in p.top(num)}, p.token.token_id: p.token}
        out.append(
            {str(tid): {"logprob": finite(t.logprob), "rank": t.rank, "decoded_token": t.text} for tid, t in entries.items()}
        )
    return out

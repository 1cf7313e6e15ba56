"""NgramProposer: prompt lookup — draft the tokens that followed the last earlier occurrence of the
context's suffix in the request's own prompt and output (vLLM's `ngram`, "prompt lookup decoding").

Data flow: per request an index maps each n-gram (n in [min_n, max_n]) to the end of its latest
occurrence; `propose` first indexes the tokens appended since its last call (the request's token
list only grows), then looks up the context's last n tokens from the longest n down and returns up
to tokens that followed that occurrence. How many: the match is then extended backwards past n
(up to MAX_MATCH_LEN tokens), and a match of L tokens drafts at most L - min_n + 1 of them
(`draft_length`), so a bare min_n-gram match risks one token and a long copied span the full
`max_tokens`: on a CPU each extra verify row costs a fraction of a step whether it is accepted
or not (benchmarks/README.md). The n-grams that end at the last token are indexed one call
late, so a lookup never finds the suffix itself. Cost per call: O(new tokens x (max_n - min_n +
1)) + O(MAX_MATCH_LEN), never O(context); memory: that many dict entries per token of a running
request, dropped at `finish`. Past the context's end a draft continues periodically (a match at
distance p says the text repeats with period p): short loops get full drafts, as do drafts guessed
past `num_unknown` tokens in flight (speculator.py).
"""

from __future__ import annotations

from shardserve.workers.spec.proposer import Proposer

MAX_MATCH_LEN = 32  # the backward extension of a match stops here (a longer one drafts max_tokens anyway)


class _RequestIndex:
    __slots__ = ("ends", "num_indexed")

    def __init__(self, num_sizes: int) -> None:
        self.ends: list[dict[tuple[int, ...], int]] = [{} for _ in range(num_sizes)]
        self.num_indexed = 0  # n-grams ending before this position are in `ends`


class NgramProposer(Proposer):
    def __init__(self, min_n: int, max_n: int) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"ngram sizes must satisfy 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.min_n, self.max_n = min_n, max_n
        self._index: dict[str, _RequestIndex] = {}

    def propose(self, request_id: str, token_ids: list[int], num_prompt_tokens: int, max_tokens: int,
                num_unknown: int = 0) -> list[int]:
        """Up to `max_tokens` (draft_length of the match) tokens following the match's next
        `num_unknown` (the guess of tokens in flight, skipped)."""
        if max_tokens <= 0 or len(token_ids) < self.min_n + 1:
            return []
        index = self._index.get(request_id)
        if index is None:
            index = self._index[request_id] = _RequestIndex(self.max_n - self.min_n + 1)
        self._extend(index, token_ids, len(token_ids) - 1)
        length = len(token_ids)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            end = index.ends[n - self.min_n].get(tuple(token_ids[length - n:]))
            if end is not None:
                match_len = n + _agreeing_before(token_ids, end - n, length - n, MAX_MATCH_LEN - n)
                start = end + num_unknown
                stop = start + min(max_tokens, self.draft_length(match_len))
                if stop <= length:
                    return token_ids[start:stop]
                # past the context's end the match repeats with its period (a loop of length - end tokens)
                period = length - end
                return [token_ids[j if j < length else end + (j - end) % period] for j in range(start, stop)]
        return []

    def draft_length(self, match_len: int) -> int:
        """Draft tokens for a match of `match_len` tokens: 1 for a bare min_n-gram, one more per token beyond."""
        return max(1, match_len - self.min_n + 1)

    def _extend(self, index: _RequestIndex, token_ids: list[int], upto: int) -> None:
        """Index the n-grams ending at positions [num_indexed, upto) (end = position + 1)."""
        min_n = self.min_n
        for position in range(index.num_indexed, upto):
            end = position + 1
            for n in range(min_n, min(self.max_n, end) + 1):
                index.ends[n - min_n][tuple(token_ids[end - n : end])] = end
        index.num_indexed = max(index.num_indexed, upto)

    def finish(self, request_id: str, token_ids: list[int], num_prompt_tokens: int) -> None:
        self._index.pop(request_id, None)


def _agreeing_before(token_ids: list[int], a: int, b: int, limit: int) -> int:
    """How many tokens (at most `limit`) right before positions a < b agree pairwise."""
    count = 0
    while count < limit and a - count > 0 and token_ids[a - count - 1] == token_ids[b - count - 1]:
        count += 1
    return count

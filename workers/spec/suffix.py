"""SuffixDecoding's proposer (arXiv 2411.04975): draft tokens from text the model already wrote.

Two sources, each a `SuffixIndex` (suffix_index.py): the request's own context (prompt + output
so far, indexed incrementally: each `propose` indexes only the tokens appended since the last
one, read in place from the caller's list), and one cache per engine of earlier requests'
outputs, which `finish` fills and which evicts whole requests, oldest first, beyond
`max_cached_tokens`. For each source, `propose` matches the longest suffix of the context (at
most `max_depth` tokens), takes its `max_matches` newest occurrences and extends the draft token
by token with the most frequent next token among the occurrences still agreeing (ties: the
newest). The draft's cumulative probability (occurrences agreeing with the whole draft / all
occurrences) must stay >= `min_probability`; the sum of cumulative probabilities is the
expected accepted length, and the source with the larger one wins (ties: the longer matched
suffix — on a repeated task the cache matches far deeper than the prompt does —, then the longer
draft, then the request's own context).
Cost of one `propose`: O(max_depth) per appended token + O(max_depth) per source +
O(max_tokens * max_matches), independent of the context's and the cache's length.
Memory: see suffix_index.py; the cache also keeps each output token once (4 bytes).
Pure Python: the work per call is a few dozen dict look-ups, too small for numpy to pay off.
Not thread-safe: one engine thread calls it. `finish` must follow every request that was proposed
for (aborted ones too), or its index stays.
"""

from __future__ import annotations

from array import array
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from shardserve.workers.spec.proposer import Proposer
from shardserve.workers.spec.suffix_index import SuffixIndex


@dataclass(frozen=True)
class Draft:
    """One source's proposal: `token_ids` with `score` = the sum of their cumulative probabilities,
    from occurrences of the context's last `depth` tokens."""

    token_ids: tuple[int, ...]
    score: float
    depth: int = 0


_NO_DRAFT = Draft((), 0.0)


class _OutputCache:
    """Earlier requests' output tokens in one array (each sequence after a -1 separator), indexed."""

    def __init__(self, max_tokens: int, max_depth: int) -> None:
        self.max_tokens = max_tokens
        self.store = array("i")
        self.index = SuffixIndex(self.store, max_depth)
        self.sequences: deque[tuple[int, int]] = deque()  # (separator position, end position)
        self.num_tokens = 0

    def add(self, output_ids: Sequence[int]) -> None:
        output_ids = output_ids[len(output_ids) - min(len(output_ids), self.max_tokens):]
        if not output_ids:
            return
        index = self.index
        separator = index.base + len(self.store)
        self.store.append(-1)
        self.store.extend(output_ids)
        end = separator + 1 + len(output_ids)
        index.reserve(end)
        for position in range(separator + 1, end):
            index.insert(position)
        self.sequences.append((separator, end))
        self.num_tokens += len(output_ids)
        while self.num_tokens > self.max_tokens:
            self._evict_oldest()

    def _evict_oldest(self) -> None:
        separator, end = self.sequences.popleft()
        for position in range(separator + 1, end):
            self.index.remove_oldest(position)
        self.num_tokens -= end - separator - 1
        live_start = self.sequences[0][0] if self.sequences else end
        self.index.live_start = live_start
        if live_start - self.index.base >= len(self.store) // 2:  # amortized O(1) per evicted token
            self.index.drop_front(live_start)


class _RequestContext:
    """One running request's own context, indexed up to its second-to-last token (the last has no
    continuation yet, and matching it would only find the query itself)."""

    def __init__(self, token_ids: Sequence[int], max_depth: int) -> None:
        self.index = SuffixIndex(token_ids, max_depth)
        self.num_indexed = 0

    def catch_up(self, token_ids: Sequence[int]) -> int:
        """Index the tokens appended since the last call; returns how many that was."""
        self.index.tokens = token_ids
        end = len(token_ids) - 1
        if end <= self.num_indexed:
            return 0
        self.index.reserve(end)
        for position in range(self.num_indexed, end):
            self.index.insert(position)
        added = end - self.num_indexed
        self.num_indexed = end
        return added


class SuffixProposer(Proposer):
    """Speculative draft tokens from the request's own context and from earlier outputs (one per engine)."""

    def __init__(self, max_cached_tokens: int = 200_000, max_depth: int = 24, min_probability: float = 0.1,
                 max_matches: int = 64) -> None:
        _check_int("max_cached_tokens", max_cached_tokens, 0, 1 << 30)
        _check_int("max_depth", max_depth, 1, 1024)
        _check_int("max_matches", max_matches, 1, 1 << 16)
        if not 0.0 <= min_probability <= 1.0:
            raise ValueError(f"min_probability must be in [0, 1], got {min_probability!r}")
        self.max_depth = max_depth
        self.min_probability = float(min_probability)
        self.max_matches = max_matches
        self._cache = _OutputCache(max_cached_tokens, max_depth)
        self._requests: dict[str, _RequestContext] = {}
        self.num_indexed = 0  # request-context tokens indexed so far (each exactly once)
        self.num_index_steps = 0  # trie levels walked indexing them: at most max_depth per token

    @property
    def num_cached_tokens(self) -> int:
        return self._cache.num_tokens

    @property
    def num_cache_nodes(self) -> int:
        """Trie nodes of the output cache (its memory beyond 4 + 4 * max_depth bytes per token)."""
        return self._cache.index.num_nodes

    def propose(self, request_id: str, token_ids: list[int], num_prompt_tokens: int, max_tokens: int,
                num_unknown: int = 0) -> list[int]:
        """Up to `max_tokens` draft tokens to follow `token_ids` (the request's prompt + outputs so far; the
        list only grows between calls of one request id, and the same list object may be passed each time)
        and `num_unknown` tokens in flight (the draft continues past its guess of them, which is cut off).
        [] when nothing in the cache or the request's own prompt continues its current suffix."""
        _check_int("max_tokens", max_tokens, 0, 1 << 20)
        _check_int("num_unknown", num_unknown, 0, 1 << 20)
        _check_int("num_prompt_tokens", num_prompt_tokens, 0, len(token_ids))
        state = self._requests.get(request_id)
        if state is None or len(token_ids) <= state.num_indexed:  # new, or (against the contract) shrunk
            state = self._requests[request_id] = _RequestContext(token_ids, self.max_depth)
        steps = state.index.num_steps
        self.num_indexed += state.catch_up(token_ids)
        self.num_index_steps += state.index.num_steps - steps
        if max_tokens == 0 or not token_ids:
            return []
        own = self._draft(state.index, token_ids, num_unknown + max_tokens)
        cached = self._draft(self._cache.index, token_ids, num_unknown + max_tokens)
        if (cached.score, cached.depth, len(cached.token_ids)) > (own.score, own.depth, len(own.token_ids)):
            return list(cached.token_ids[num_unknown:])
        return list(own.token_ids[num_unknown:])

    def finish(self, request_id: str, token_ids: list[int], num_prompt_tokens: int) -> None:
        """The request left the engine: forget its per-request state and add its OUTPUT tokens
        (token_ids[num_prompt_tokens:]) to the cross-request cache (bounded: oldest requests evicted first
        once more than max_cached_tokens tokens are cached)."""
        _check_int("num_prompt_tokens", num_prompt_tokens, 0, len(token_ids))
        self._requests.pop(request_id, None)
        self._cache.add(token_ids[num_prompt_tokens:])

    def _draft(self, index: SuffixIndex, context: Sequence[int], max_tokens: int) -> Draft:
        """Greedy by frequency over the newest occurrences of the context's longest matching suffix."""
        depth, positions = index.match(context, self.max_matches)
        if not positions:
            return _NO_DRAFT
        total = len(positions)
        tokens, size = index.tokens, len(index.tokens)
        agreeing = [position - index.base for position in positions]  # store indices, newest first
        draft: list[int] = []
        score = 0.0
        for offset in range(1, max_tokens + 1):
            next_ids = [tokens[end + offset] if end + offset < size else -1 for end in agreeing]
            best = next_ids[0]
            num_best = next_ids.count(best)
            if num_best < len(next_ids) or best < 0:  # they disagree (or the newest ended)
                counts: dict[int, int] = {}
                for next_id in next_ids:  # newest first, so a tie goes to the newest occurrence
                    if next_id >= 0:
                        counts[next_id] = counts.get(next_id, 0) + 1
                if not counts:
                    break
                best = max(counts, key=counts.__getitem__)
                num_best = counts[best]
            probability = num_best / total  # = the product of the per-token probabilities
            if probability < self.min_probability:
                break
            draft.append(best)
            score += probability
            if num_best < len(agreeing):
                agreeing = [end for end, next_id in zip(agreeing, next_ids, strict=True) if next_id == best]
        return Draft(tuple(draft), score, depth)


def _check_int(name: str, value: int, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")

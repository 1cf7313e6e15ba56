"""InFlightRequests: the scheduler's accounting of requests in batches whose results are not applied.

The scheduler's policy (scheduler.py) asks it where a request stands; it never decides who runs:
    track(id, num_new, sample)  ← a batch scheduled `num_new` tokens of the request (`_build_output`)
    scheduled_end(request)      → (next chunk's start, end of its known or in-flight tokens)
    fed_token_ids(...)          → the tokens a batch feeds, PLACEHOLDER for ids still on the device
    free(request)               ← a finished request: its blocks now, or when its last batch returns
    returned(scheduled)         ← a batch was applied; True if the request finished in flight
                                  (its result is dropped)
Per request in flight an `Ahead` counts the batches holding it, the tokens they compute (the next
chunk starts after them) and the tokens they sample. A sampled token is not on the host until its
batch is applied (async scheduling), so the next batch feeds PLACEHOLDER at its position and the
runner replaces it on the device with the id its sampler wrote (runner/model_runner.py). A request
finished while in flight leaves the scheduler at once but keeps its KV blocks until the last batch
holding it returns: the ranks may still write its K/V. With one batch in flight at most
(synchronous) nothing is ever tracked.
"""

from __future__ import annotations

from shardserve.workers.kv_cache.manager import KVCacheManager
from shardserve.workers.request import Request
from shardserve.workers.step_types import ScheduledRequest

PLACEHOLDER = -1  # a token id fed before it is known on the host (async scheduling)

# A request's share of the batches in flight: (num_batches, num_tokens, num_placeholders).
# A plain tuple of ints, not a small object: one is made per request and batch, and such tuples
# cost Python's garbage collector nothing (it stops tracking them), while small objects that
# live a few batches made it run full collections, ~0.2 s each in a process that imports torch
# (benchmarks/driver_overhead.py at PP 2 x 3: three of them, ~0.6 s of a ~3.5 s run).
Ahead = tuple[int, int, int]


class InFlightRequests:
    def __init__(self, kv: KVCacheManager) -> None:
        self.kv = kv
        self.ahead: dict[str, Ahead] = {}  # ids scheduled in a batch whose result is not applied yet
        self._free_on_return: dict[str, Request] = {}  # finished while in flight: blocks still held

    def __len__(self) -> int:
        """Requests in batches whose results are not applied yet (finished ones included)."""
        return len(self.ahead)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.ahead

    def num_batches(self, request_id: str) -> int:
        """Batches in flight that hold `request_id` (0 when it is not in flight)."""
        ahead = self.ahead.get(request_id)
        return ahead[0] if ahead is not None else 0

    def holds_blocks_of(self, request_id: str) -> bool:
        """True while a finished request of this id still holds blocks (a new one must wait)."""
        return request_id in self._free_on_return

    def track(self, request_id: str, num_new: int, sample: bool) -> None:
        """Add a scheduled batch's share to its request's `Ahead` (it is now in flight)."""
        num_batches, num_tokens, num_placeholders = self.ahead.get(request_id, (0, 0, 0))
        self.ahead[request_id] = (num_batches + 1, num_tokens + num_new, num_placeholders + sample)

    def returned(self, scheduled: ScheduledRequest) -> bool:
        """Take an applied batch's share off its request's `Ahead`; True if the request finished
        while in flight (its result is dropped; its blocks are freed with its last batch)."""
        request_id = scheduled.request_id
        ahead = self.ahead.get(request_id)
        still_in_flight = False
        if ahead is not None:
            num_batches, num_tokens, num_placeholders = ahead
            if num_batches == 1:  # this was the last batch holding it
                del self.ahead[request_id]
            else:
                still_in_flight = True
                self.ahead[request_id] = (num_batches - 1, num_tokens - len(scheduled.token_ids),
                                          num_placeholders - scheduled.sample)
        finished = self._free_on_return.get(request_id)
        if finished is None:
            return False
        if not still_in_flight:  # the last batch holding it is back: no rank writes its K/V
            del self._free_on_return[request_id]
            self.kv.free(finished)
        return True

    def free(self, request: Request) -> None:
        """Free a finished request's blocks now, or when the last batch holding it returns."""
        if request.request_id in self.ahead:
            self._free_on_return[request.request_id] = request
        else:
            self.kv.free(request)

    def scheduled_end(self, request: Request, ahead: Ahead | None) -> tuple[int, int]:
        """(tokens computed or being computed, tokens known or being sampled) of `request`, whose
        entry in `ahead` is `ahead`: where its next chunk starts and where its schedulable tokens end."""
        if ahead is None:
            return request.num_computed_tokens, len(request.all_token_ids)
        _, num_tokens, num_placeholders = ahead
        return request.num_computed_tokens + num_tokens, len(request.all_token_ids) + num_placeholders

    @staticmethod
    def ends_in_flight(request: Request, ahead: Ahead, max_model_len: int) -> bool:
        """True when the tokens sampled in flight (`ahead`) surely end the request (max_tokens
        or max_model_len), so it must not be scheduled again."""
        num_placeholders = ahead[2]
        if num_placeholders == 0:
            return False
        num_output = len(request.output_token_ids) + num_placeholders
        return (num_output >= request.sampling_params.max_tokens
                or len(request.all_token_ids) + num_placeholders >= max_model_len)

    @staticmethod
    def fed_token_ids(all_token_ids: list[int], start: int, num_new: int) -> tuple[int, ...]:
        """all_token_ids[start : start + num_new], with PLACEHOLDER for the tokens a batch in flight
        samples (async scheduling) that are not on the host yet."""
        if num_new == 1:  # a decode: no slice list
            return (all_token_ids[start],) if start < len(all_token_ids) else (PLACEHOLDER,)
        token_ids = all_token_ids[start : start + num_new]
        if len(token_ids) < num_new:
            token_ids += [PLACEHOLDER] * (num_new - len(token_ids))
        return tuple(token_ids)

"""InFlightRequests: the scheduler's accounting of requests in batches whose results are not applied.

The scheduler's policy (scheduler.py) asks it where a request stands; it never decides who runs:
    track(id, num_new, num_placeholders) ← a batch scheduled tokens of it (`_build_output`)
    scheduled_end(request) / fed_token_ids(...) → the next chunk's start and end, and its tokens
                                  (PLACEHOLDER for ids still on the device)
    roll_back(id)               ← a verify step kept fewer drafts than later batches assumed
    free(request) / returned(scheduled) ← a finished request; an applied batch (True: drop its result)
Per request in flight an `Ahead` counts the batches holding it, the tokens they compute (the next
chunk starts after them) and the tokens they add if all their drafts are accepted (1 sampled +
drafts, optimistic). A sampled token is not on the host until its batch is applied, so the next
batch feeds PLACEHOLDER at its position and the runner replaces it on the device with the id its
sampler wrote (for a verify row, the draw after its last draft). When the verify step rejects a
draft, the later batches holding the request computed at wrong positions: `roll_back` marks them
stale (their results are dropped as they return, `rolled_back` tells InFlightBatches how many) and
the request is scheduled again from its accepted length; their K/V past it is rewritten before it
is read. A finished request keeps its KV blocks until the last batch holding it returns.
"""

from __future__ import annotations

from shardserve.workers.kv_cache.manager import KVCacheManager
from shardserve.workers.request import Request
from shardserve.workers.step_types import ScheduledRequest

PLACEHOLDER = -1  # a token id fed before it is known on the host (async scheduling)

# A request's share of the batches in flight: (num_batches, num_tokens, num_placeholders), stale
# batches (roll_back) counted in num_batches only.
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
        self._stale: dict[str, int] = {}  # id -> its oldest batches in flight whose results are void
        self.rolled_back: dict[str, int] = {}  # id -> stale batches since the last take_rolled_back()

    def __len__(self) -> int:
        """Requests in batches whose results are not applied yet (finished ones included)."""
        return len(self.ahead)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.ahead

    def num_batches(self, request_id: str) -> int:
        """Batches in flight that hold `request_id` with a result still to apply (stale ones left out)."""
        ahead = self.ahead.get(request_id)
        return ahead[0] - self._stale.get(request_id, 0) if ahead is not None else 0

    def holds_blocks_of(self, request_id: str) -> bool:
        """True while a finished request of this id still holds blocks (a new one must wait)."""
        return request_id in self._free_on_return

    def track(self, request_id: str, num_new: int, num_sampled: int) -> None:
        """Add a scheduled batch's share to its request's `Ahead` (it is now in flight): `num_new`
        tokens computed, `num_sampled` tokens added if its drafts are all accepted (sample + drafts)."""
        num_batches, num_tokens, num_placeholders = self.ahead.get(request_id, (0, 0, 0))
        self.ahead[request_id] = (num_batches + 1, num_tokens + num_new, num_placeholders + num_sampled)

    def roll_back(self, request_id: str) -> None:
        """A verify step of `request_id` just applied kept fewer drafts than the batches still in
        flight after it assumed: their shares are void (stale), their results are to be dropped."""
        ahead = self.ahead.get(request_id)
        if ahead is None:
            return
        num_live = ahead[0] - self._stale.get(request_id, 0)
        if num_live == 0:
            return
        self._stale[request_id] = ahead[0]
        self.ahead[request_id] = (ahead[0], 0, 0)
        self.rolled_back[request_id] = self.rolled_back.get(request_id, 0) + num_live

    def take_rolled_back(self) -> dict[str, int]:
        """Request id -> results to drop, of the batches `roll_back` made stale since the last call."""
        rolled_back, self.rolled_back = self.rolled_back, {}
        return rolled_back

    def returned(self, scheduled: ScheduledRequest) -> bool:
        """Take an applied batch's share off its request's `Ahead`; True if its result is dropped:
        the request finished while in flight (its blocks are freed with its last batch) or this
        batch is stale (roll_back)."""
        request_id = scheduled.request_id
        ahead = self.ahead.get(request_id)
        still_in_flight = stale = False
        if ahead is not None:
            num_batches, num_tokens, num_placeholders = ahead
            num_stale = self._stale.get(request_id, 0)
            if num_stale:  # batches return oldest first: this is one of the stale ones (share taken off)
                stale = True
                if num_stale == 1:
                    del self._stale[request_id]
                else:
                    self._stale[request_id] = num_stale - 1
            if num_batches == 1:  # this was the last batch holding it
                del self.ahead[request_id]
            else:
                still_in_flight = True
                if stale:
                    self.ahead[request_id] = (num_batches - 1, num_tokens, num_placeholders)
                else:
                    self.ahead[request_id] = (num_batches - 1, num_tokens - len(scheduled.token_ids),
                                              num_placeholders - scheduled.sample - scheduled.num_drafts)
        finished = self._free_on_return.get(request_id)
        if finished is None:
            return stale
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
        """True when the tokens sampled in flight (`ahead`, drafts assumed accepted) end the request
        (max_tokens or max_model_len), so it must not be scheduled again (roll_back undoes it)."""
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

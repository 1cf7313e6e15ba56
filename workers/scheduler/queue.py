"""Waiting queues of the scheduler: the order in which waiting requests are admitted.

Data flow: `add_request` pushes a new request to the back; a preempted request is pushed to
the front (`push_front`) so it resumes before newer work; the scheduler `peek`s the head,
tries to give it blocks and `pop`s it once admitted; an abort `remove`s it from anywhere.
FCFS keeps arrival order (a deque). PRIORITY keeps the queue sorted by
(priority, arrival_time, insertion number): lower priority values first, ties by arrival,
and a preempted request simply re-enters at its (priority, arrival) place.
"""

from __future__ import annotations

import abc
import bisect
import itertools
from collections import deque
from collections.abc import Iterator

from shardserve.workers.request import Request


class RequestQueue(abc.ABC):
    """Common interface; use `make_request_queue(policy)`."""

    @abc.abstractmethod
    def push(self, request: Request) -> None:
        """Add a new request at its place (the back under FCFS)."""

    @abc.abstractmethod
    def push_front(self, request: Request) -> None:
        """Re-add a preempted request so it resumes before newer requests."""

    @abc.abstractmethod
    def peek(self) -> Request:
        """The next request to admit (the queue must not be empty)."""

    @abc.abstractmethod
    def pop(self) -> Request:
        """Remove and return the next request to admit."""

    @abc.abstractmethod
    def remove(self, request: Request) -> None:
        """Remove a request from anywhere in the queue (an abort)."""

    @abc.abstractmethod
    def __iter__(self) -> Iterator[Request]:
        """Requests in admission order."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of queued requests."""

    def __bool__(self) -> bool:
        return len(self) > 0


class FCFSQueue(RequestQueue):
    def __init__(self) -> None:
        self._requests: deque[Request] = deque()

    def push(self, request: Request) -> None:
        self._requests.append(request)

    def push_front(self, request: Request) -> None:
        self._requests.appendleft(request)

    def peek(self) -> Request:
        return self._requests[0]

    def pop(self) -> Request:
        return self._requests.popleft()

    def remove(self, request: Request) -> None:
        self._requests.remove(request)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._requests)

    def __len__(self) -> int:
        return len(self._requests)


class PriorityQueue(RequestQueue):
    def __init__(self) -> None:
        # Sorted list of (priority, arrival_time, insertion number, request); the insertion
        # number breaks exact ties deterministically and keeps Requests out of comparisons.
        self._entries: list[tuple[int, float, int, Request]] = []
        self._counter = itertools.count()

    def push(self, request: Request) -> None:
        entry = (request.priority, request.metrics.arrival_time, next(self._counter), request)
        bisect.insort(self._entries, entry)

    def push_front(self, request: Request) -> None:
        self.push(request)  # order is by (priority, arrival): a resumed request finds its place

    def peek(self) -> Request:
        return self._entries[0][3]

    def pop(self) -> Request:
        return self._entries.pop(0)[3]

    def remove(self, request: Request) -> None:
        for index, entry in enumerate(self._entries):
            if entry[3] is request:
                del self._entries[index]
                return
        raise ValueError(f"request {request.request_id!r} is not in the queue")

    def __iter__(self) -> Iterator[Request]:
        return (entry[3] for entry in self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def make_request_queue(policy: str) -> RequestQueue:
    if policy == "fcfs":
        return FCFSQueue()
    if policy == "priority":
        return PriorityQueue()
    raise ValueError(f"policy must be fcfs or priority, got {policy!r}")

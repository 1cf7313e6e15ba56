"""The rank loop under async scheduling and on pipeline stages (proc._serve_overlapped): step N+1
is launched before step N is finished, and a step is still finished and sent on its own when no
next step comes. Every test runs with the pipe read directly (async scheduling) and through the
inbox thread (pipeline stages).

The real loop runs on a thread against a real pipe; the worker is a recorder whose "device"
finishes a step only when the test says so (on the CPU a real runner finishes every step inside
`launch`, so the interleaving cannot be forced there). The TP engine tests cover the same loop
with real ranks end to end.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
from dataclasses import dataclass, field

import pytest
from shardserve.workers.worker.proc import (
    CALL,
    OUTPUT,
    RESULT,
    SHUTDOWN,
    STEP,
    _Inbox,
    _serve_overlapped,
    decode,
    encode,
)


@dataclass
class _Pending:
    seq: int
    has_penalties: bool = False


@dataclass
class _RecordingWorker:
    """Launch/finish log; step `seq` counts as done on the device once `seq` is in `done`."""

    events: list[str] = field(default_factory=list)
    done: set[int] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    driver_waits: list[float] = field(default_factory=list)

    def launch(self, sched: dict) -> _Pending:
        with self.lock:
            self.events.append(f"launch {sched['seq']}")
        return _Pending(sched["seq"], sched.get("penalties", False))

    def step_done(self, pending: _Pending) -> bool:
        with self.lock:
            return pending.seq in self.done

    @staticmethod
    def must_finish_now(pending: _Pending) -> bool:
        return pending.has_penalties

    def finish(self, pending: _Pending) -> str:
        with self.lock:
            self.events.append(f"finish {pending.seq}")
        return f"out {pending.seq}"

    def ping(self) -> int:
        return 7

    def note_driver_wait(self, seconds: float) -> None:
        with self.lock:
            self.driver_waits.append(seconds)

    def mark_done(self, seq: int) -> None:
        with self.lock:
            self.done.add(seq)


@pytest.fixture(params=["pipe", "inbox"])
def loop(request):
    driver, rank_end = mp.Pipe(duplex=True)
    worker = _RecordingWorker()
    inbox = _Inbox(rank_end) if request.param == "inbox" else None
    thread = threading.Thread(target=_serve_overlapped, args=(worker, rank_end, inbox), daemon=True)
    thread.start()
    yield worker, driver
    driver.send_bytes(encode(SHUTDOWN, None))
    thread.join(timeout=5)
    assert not thread.is_alive(), "the loop did not stop on SHUTDOWN"


def _receive(driver, timeout: float = 5.0):
    assert driver.poll(timeout), "no message from the rank loop"
    return decode(driver.recv_bytes())


def test_next_step_launches_before_the_previous_finishes(loop) -> None:
    worker, driver = loop
    driver.send_bytes(encode(STEP, {"seq": 0}))
    driver.send_bytes(encode(STEP, {"seq": 1}))  # async driver: N+1 before waiting for N
    assert _receive(driver) == (OUTPUT, "out 0")
    worker.mark_done(1)
    assert _receive(driver) == (OUTPUT, "out 1")  # no step 2: finished once the device has it
    assert worker.events == ["launch 0", "launch 1", "finish 0", "finish 1"]


def test_the_wait_for_the_driver_after_a_finish_is_recorded(loop) -> None:
    worker, driver = loop
    driver.send_bytes(encode(STEP, {"seq": 0}))
    worker.mark_done(0)
    assert _receive(driver) == (OUTPUT, "out 0")
    assert worker.driver_waits == []  # no step message since that finish yet
    threading.Event().wait(0.05)  # the "driver" takes 50 ms to answer
    driver.send_bytes(encode(STEP, {"seq": 1}))
    worker.mark_done(1)
    assert _receive(driver) == (OUTPUT, "out 1")
    with worker.lock:
        assert len(worker.driver_waits) == 1 and 0.04 < worker.driver_waits[0] < 5.0


def test_a_lone_step_is_sent_when_done(loop) -> None:
    worker, driver = loop
    driver.send_bytes(encode(STEP, {"seq": 0}))
    assert not driver.poll(0.05)  # still on the "device": nothing sent yet
    worker.mark_done(0)
    assert _receive(driver) == (OUTPUT, "out 0")
    assert worker.events == ["launch 0", "finish 0"]


def test_penalty_step_is_finished_before_the_next_launch(loop) -> None:
    worker, driver = loop
    driver.send_bytes(encode(STEP, {"seq": 0, "penalties": True}))
    assert _receive(driver) == (OUTPUT, "out 0")  # finished at once, done or not
    worker.mark_done(1)
    driver.send_bytes(encode(STEP, {"seq": 1}))
    assert _receive(driver) == (OUTPUT, "out 1")
    assert worker.events == ["launch 0", "finish 0", "launch 1", "finish 1"]


def test_a_call_finishes_the_launched_step_first(loop) -> None:
    worker, driver = loop
    driver.send_bytes(encode(STEP, {"seq": 0}))
    driver.send_bytes(encode(CALL, ("ping", ())))
    assert _receive(driver) == (OUTPUT, "out 0")
    assert _receive(driver) == (RESULT, 7)
    assert worker.events == ["launch 0", "finish 0"]

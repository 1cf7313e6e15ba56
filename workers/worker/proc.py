"""The process side of the multi-process executor: a Worker fed through one pipe.

Messages are pickled tuples sent as raw bytes (`Connection.send_bytes`): the driver pickles a
step once and writes the same bytes to every rank's pipe; there is no RPC layer per step.
Driver -> worker:  (STEP, SchedulerOutput) | (CALL, method name) | (SHUTDOWN, None)
Worker -> driver:  (READY, num_blocks) once after start-up
                   (OUTPUT, ModelRunnerOutput) after each step, from the output rank only
                   (RESULT, value) after each CALL, from every rank
                   (ERROR, formatted traceback) before exiting with code 1
A closed pipe (the driver died) ends the loop; so does an error in a collective (a peer died:
gloo/NCCL fail after the configured timeout, or at once when the connection drops).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import sys
import traceback
from multiprocessing.connection import Connection
from typing import Any

from shardserve.workers.worker.worker import Worker, WorkerSpec

STEP, CALL, SHUTDOWN = "step", "call", "shutdown"
READY, OUTPUT, RESULT, ERROR = "ready", "output", "result", "error"
CALLABLE = ("expert_load", "ping")


def encode(kind: str, payload: Any) -> bytes:
    return pickle.dumps((kind, payload), protocol=pickle.HIGHEST_PROTOCOL)


def decode(data: bytes) -> tuple[str, Any]:
    return pickle.loads(data)


def worker_main(spec: WorkerSpec, conn: Connection) -> None:
    """Entry point of a spawned rank: build the Worker, report READY, serve until told to stop."""
    logging.basicConfig(level=logging.INFO, format=f"[rank {spec.rank}] %(levelname)s %(name)s: %(message)s")
    try:
        worker = Worker(spec)
        conn.send_bytes(encode(READY, worker.num_blocks))
        _serve(worker, conn)
    except BaseException:
        message = f"rank {spec.rank}: {traceback.format_exc()}"
        with contextlib.suppress(OSError, EOFError):
            conn.send_bytes(encode(ERROR, message))
        print(message, file=sys.stderr, flush=True)
        os._exit(1)  # no clean-up: a collective clean-up could wait on the peer that failed
    worker.shutdown()


def _serve(worker: Worker, conn: Connection) -> None:
    while True:
        try:
            kind, payload = decode(conn.recv_bytes())
        except EOFError:
            return  # the driver is gone
        if kind == STEP:
            output = worker.execute(payload)
            if output is not None:
                conn.send_bytes(encode(OUTPUT, output))
        elif kind == CALL:
            if payload not in CALLABLE:
                raise ValueError(f"worker call must be one of {CALLABLE}, got {payload!r}")
            conn.send_bytes(encode(RESULT, getattr(worker, payload)()))
        elif kind == SHUTDOWN:
            return
        else:
            raise ValueError(f"unknown message kind {kind!r}")

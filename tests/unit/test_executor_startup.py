"""make_executor starts a worker group again when its rendezvous port was taken in the meantime
(free_port() only finds a port that was free a moment ago); any other start-up failure, or a
port lost on every attempt, is raised as is."""

from __future__ import annotations

import pytest
from shardserve.workers import launch as executor_module
from shardserve.workers.config import EngineConfig, ModelConfig, ParallelConfig
from shardserve.workers.worker.channel import WorkerGroupError

CONFIG = EngineConfig(model=ModelConfig(model="dummy:tiny-llama", dtype="float32", device="cpu"),
                      parallel=ParallelConfig(tensor_parallel_size=2))
PORT_TAKEN = "worker rank 0 failed:\n... DistNetworkError: ... message: address already in use"


def _fake_group(monkeypatch, errors: list[str]) -> list[int]:
    attempts = []

    def start(config):
        attempts.append(1)
        if len(attempts) <= len(errors):
            raise WorkerGroupError(errors[len(attempts) - 1])
        return "group"

    monkeypatch.setattr(executor_module, "MultiprocExecutor", start)
    return attempts


def test_lost_port_is_retried(monkeypatch) -> None:
    attempts = _fake_group(monkeypatch, [PORT_TAKEN, PORT_TAKEN])
    assert executor_module.make_executor(CONFIG, None, None) == "group" and len(attempts) == 3


def test_lost_port_on_every_attempt_raises(monkeypatch) -> None:
    attempts = _fake_group(monkeypatch, [PORT_TAKEN] * executor_module.STARTUP_ATTEMPTS)
    with pytest.raises(WorkerGroupError, match="address already in use"):
        executor_module.make_executor(CONFIG, None, None)
    assert len(attempts) == executor_module.STARTUP_ATTEMPTS


def test_other_failures_are_not_retried(monkeypatch) -> None:
    attempts = _fake_group(monkeypatch, ["worker rank 1 died with exit code 1"])
    with pytest.raises(WorkerGroupError, match="died"):
        executor_module.make_executor(CONFIG, None, None)
    assert len(attempts) == 1

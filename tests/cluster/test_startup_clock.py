"""The `process` start-up stage: a worker Ray started long before the actor (prestarted, idle) does not
count its idle time; a worker started for the actor counts from its own start."""

import time

from shardserve.cluster.metrics import startup


def test_fresh_worker_counts_from_its_start(monkeypatch):
    monkeypatch.setattr(startup, "_AGE_AT_IMPORT", 1.5)
    monkeypatch.setattr(startup, "_IMPORTED", time.monotonic() - 2.0)
    process = startup.StartupClock().stages["process"]
    assert 3.4 <= process <= 4.5


def test_prestarted_worker_counts_from_the_actor_class_load(monkeypatch):
    monkeypatch.setattr(startup, "_AGE_AT_IMPORT", 74.0)  # idle in Ray's pool for a minute
    monkeypatch.setattr(startup, "_IMPORTED", time.monotonic() - 2.0)
    process = startup.StartupClock().stages["process"]
    assert 1.9 <= process <= 3.0


def test_stages_close_in_order():
    clock = startup.StartupClock()
    time.sleep(0.01)
    assert clock.stage("engine") >= 0.01 and list(clock.stages)[-1] == "engine"

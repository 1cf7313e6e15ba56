"""The start-up heap is frozen after an engine starts and thawed at its shutdown (workers/heap.py)."""

import gc
import subprocess
import sys

from shardserve.workers.config import EngineConfig, ModelConfig
from shardserve.workers.engine import LLMEngine
from shardserve.workers.heap import freeze_startup_heap, thaw_heap


def test_freeze_moves_live_objects_out_of_full_collections_and_thaw_returns_them():
    thaw_heap()
    kept = [[i] for i in range(1000)]  # tracked containers alive at "start-up"
    frozen = freeze_startup_heap()
    try:
        assert frozen >= len(kept)  # (the count may drop at once: frozen objects are still freed by refcount)
        tracked = {id(o) for o in gc.get_objects()}
        assert not any(id(o) in tracked for o in kept)  # a full pass no longer walks them
    finally:
        thaw_heap()
    assert gc.get_freeze_count() == 0
    assert id(kept[0]) in {id(o) for o in gc.get_objects()}


def test_engine_freezes_at_start_and_thaws_at_shutdown():
    thaw_heap()
    engine = LLMEngine(EngineConfig(model=ModelConfig(model="dummy:tiny-llama", dtype="float32", device="cpu")))
    try:
        assert gc.get_freeze_count() > 0
        assert not any(o is engine.scheduler for o in gc.get_objects())  # built before the freeze
    finally:
        engine.shutdown()
    assert gc.get_freeze_count() == 0


def test_a_worker_rank_freezes_its_heap_once_ready():
    # in its own process: the rank initialises torch.distributed (world of one, gloo)
    code = """
import gc
from shardserve.workers.config import EngineConfig, ModelConfig
from shardserve.workers.worker.executor import free_port
from shardserve.workers.worker.worker import Worker, WorkerSpec
config = EngineConfig(model=ModelConfig(model="dummy:tiny-llama", dtype="float32", device="cpu"))
worker = Worker(WorkerSpec(config, 0, "127.0.0.1", free_port(), backend="gloo", num_threads=1))
print(gc.get_freeze_count() > 1000, any(o is worker.runner for o in gc.get_objects()))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["True", "False"]  # frozen, and the runner among the frozen

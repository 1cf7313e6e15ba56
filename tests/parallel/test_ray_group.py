"""The Ray worker group (workers/group.py) on a local Ray cluster, gloo on CPU.

One Ray instance serves the module (the session's, when the cluster tests already started one;
ranks then ask for a quarter CPU each so they fit beside its apps).
TP = 2 on a tiny safetensors Llama through `launcher="ray"` must give the single-process
engine's greedy tokens and logprobs; a rank actor killed with `ray.kill` must fail the next step
(mid-generation) or the next health check (idle) with WorkerGroupError within seconds, and leave
no rank actor or placement group behind. PP = 2 through Ray keeps 2 micro-batches in flight
(submit / collect over the same sockets) and still gives the single-process outputs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace

import pytest
from parallel_helpers import (
    assert_same_outputs,
    engine_config,
    generate,
    make_prompts,
    run_engine,
    single_process,
    write_checkpoint,
)
from shardserve.workers.engine import LLMEngine
from shardserve.workers.request import SamplingParams
from shardserve.workers.worker.executor import WorkerGroupError

pytestmark = [pytest.mark.slow, pytest.mark.ray]
FAIL_WITHIN_S = 10.0
RANK_CPUS = 0.25


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


@pytest.fixture(autouse=True)
def small_ranks(monkeypatch) -> None:
    """Ranks ask for RANK_CPUS instead of a whole CPU, so the group fits beside the cluster tests' apps."""
    from shardserve.workers import group

    monkeypatch.setattr(group, "default_rank_resources", lambda config: group.RankResources(RANK_CPUS, 0.0))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return write_checkpoint("llama", tmp_path_factory.mktemp("ckpt") / "llama")


def ray_config(folder, tp: int = 2, pp: int = 1):
    config = engine_config(folder, tp=tp, pp=pp)
    return replace(config, parallel=replace(config.parallel, launcher="ray"))


def assert_group_gone(executor) -> None:
    """Every rank's loop ended, every rank actor is dead, the group's placement group is removed."""
    import ray

    ended, _ = ray.wait(executor._run_refs, num_returns=len(executor._run_refs), timeout=FAIL_WITHIN_S)
    assert len(ended) == len(executor.actors), "a rank's loop is still running"
    for actor in executor.actors:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.start.remote(b"probe"), timeout=FAIL_WITHIN_S)
    assert ray.util.placement_group_table(executor._pg)["state"] == "REMOVED"


def test_tp2_on_ray_equals_single_process_then_dead_rank_fails_health(ray_cluster, llama) -> None:
    import ray
    from shardserve.workers.group import RayExecutor

    config = ray_config(llama)
    prompts = make_prompts(250)
    want = generate(single_process(config), prompts)
    engine = LLMEngine(config)
    executor = engine.executor
    try:
        assert isinstance(executor, RayExecutor) and executor._owns_pg
        assert executor.resources.num_gpus == 0 and executor.num_blocks == 64
        assert_same_outputs(want, run_engine(engine, prompts))
        assert executor.num_steps > 0 and executor.host_time_s > 0
        assert executor.call("ping") == [0, 1]
        ranks = ray.get([a.describe.remote() for a in executor.actors], timeout=30)  # answered while serving
        assert [r["resources"] for r in ranks] == [{"CPU": RANK_CPUS}] * 2 and ranks[0]["pid"] != ranks[1]["pid"]
        executor.check_health()  # healthy: no exception
        ray.kill(executor.actors[0])  # idle: only the health check can notice
        start = time.monotonic()
        with pytest.raises(WorkerGroupError, match=r"worker rank 0 \(actor shardserve-rank-\w+-0\) died"):
            while time.monotonic() - start < FAIL_WITHIN_S:
                executor.check_health()
                time.sleep(0.1)
        assert time.monotonic() - start < FAIL_WITHIN_S
        # A step with work fails too (an idle step sends nothing to the ranks).
        engine.add_request("after-death", next(iter(prompts.values())), SamplingParams(temperature=0, max_tokens=4))
        with pytest.raises(WorkerGroupError):
            engine.step()
        assert_group_gone(executor)
    finally:
        engine.shutdown()


def test_killed_rank_fails_next_step_quickly(ray_cluster, llama) -> None:
    import ray

    engine = LLMEngine(ray_config(llama))
    executor = engine.executor
    try:
        for request_id, prompt in make_prompts(250).items():
            engine.add_request(request_id, prompt, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
        engine.step()
        engine.step()
        ray.kill(executor.actors[1])
        start = time.monotonic()
        with pytest.raises(WorkerGroupError, match=r"worker rank \d"):
            for _ in range(50):  # the next step fails; the loop only covers steps that raced the kill
                engine.step()
        assert time.monotonic() - start < FAIL_WITHIN_S
        with pytest.raises(WorkerGroupError):
            executor.check_health()
        assert_group_gone(executor)
    finally:
        engine.shutdown()


def test_unplaceable_group_fails_with_what_it_needs(ray_cluster, llama) -> None:
    import ray
    from shardserve.workers.group import RankResources, RayExecutor

    before = set(ray.util.placement_group_table())
    with pytest.raises(WorkerGroupError, match=r"could not reserve 2 bundles of \{'CPU': 1000\.0\} \(STRICT_PACK\)"):
        RayExecutor(ray_config(llama), resources=RankResources(1000.0, 0.0), startup_timeout_s=1.0)
    created = [pg for pg_id, pg in ray.util.placement_group_table().items() if pg_id not in before]
    assert [pg["state"] for pg in created] == ["REMOVED"]


def test_pp2_on_ray_keeps_two_batches_in_flight(ray_cluster, llama) -> None:
    config = ray_config(llama, tp=1, pp=2)
    prompts = make_prompts(250, (5, 11, 23, 7, 3))
    want = generate(single_process(config), prompts)
    engine = LLMEngine(config)
    try:
        assert_same_outputs(want, run_engine(engine, prompts))
        assert engine.stats().max_batches_in_flight == 2
    finally:
        engine.shutdown()
    assert_group_gone(engine.executor)

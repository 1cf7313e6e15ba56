"""Pipeline parallelism across two Ray nodes: one stage per node, outputs equal to one process.

A two-node Ray cluster on this machine (`ray.cluster_utils.Cluster`: a head and a worker node,
each its own raylet with 1 CPU and a custom resource naming it, `node_a` / `node_b`) runs a PP 2
worker group of the tiny random Llama through the Ray launcher (workers/group.py). Each rank asks
for 1 CPU, so the group's PACK placement group cannot put both bundles on one node: stage 0 and
stage 1 land on different nodes, talk gloo across them, and their outputs (token ids and
logprobs of greedy decoding) must equal the single-process engine's.

A Ray driver joins one cluster per process, and the session's `cluster` fixture may already have
joined its own, so the two-node cluster lives in a child process: this file run as a script
(`python test_multinode.py CHECKPOINT OUT`) builds the cluster, runs the group, reports where each
rank ran (`RankActor.describe`: node id) and the outputs as a pickle, and tears the cluster down.
The test compares them with a single-process run in the test's own process.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray]
NODE_RESOURCES = ("node_a", "node_b")  # custom resource of the head and of the worker node
JOB_TIMEOUT_S = 480


def _helpers() -> Any:
    """tests/parallel/parallel_helpers.py (checkpoint writer, engine runs, output comparison)."""
    folder = str(Path(__file__).resolve().parents[1] / "parallel")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    import parallel_helpers

    return parallel_helpers


def pp2_config(folder: Path) -> Any:
    from dataclasses import replace

    config = _helpers().engine_config(folder, pp=2)
    return replace(config, parallel=replace(config.parallel, launcher="ray"))


def run_two_node_job(folder: Path, out: Path) -> None:
    """The child process: two-node cluster, PP 2 group through Ray, placement and outputs to `out`."""
    import ray
    from ray.cluster_utils import Cluster
    from shardserve.workers.engine import LLMEngine
    from shardserve.workers.group import RayExecutor

    helpers = _helpers()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {NODE_RESOURCES[0]: 1}, "include_dashboard": False})  # GCS port: a free one
    try:
        cluster.add_node(num_cpus=1, resources={NODE_RESOURCES[1]: 1})
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        nodes = {name: n["NodeID"] for n in ray.nodes() if n["Alive"] for name in NODE_RESOURCES
                 if name in n["Resources"]}
        engine = LLMEngine(pp2_config(folder))
        try:
            executor = engine.executor
            assert isinstance(executor, RayExecutor)
            ranks = ray.get([actor.describe.remote() for actor in executor.actors], timeout=60)
            result = helpers.run_engine(engine, helpers.make_prompts(250, (5, 11, 23, 7)))
            batches_in_flight = engine.stats().max_batches_in_flight
        finally:
            engine.shutdown()
        out.write_bytes(pickle.dumps({"nodes": nodes, "ranks": ranks, "result": result,
                                      "batches_in_flight": batches_in_flight}))
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_pp2_stages_on_two_nodes_equal_one_process(tmp_path) -> None:
    helpers = _helpers()
    folder = helpers.write_checkpoint("llama", tmp_path / "llama")
    out = tmp_path / "job.pickle"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never join the session's Ray
    # A Cluster writes its address to RAY_TMPDIR/ray/ray_current_cluster, where any plain `ray.init()`
    # on the machine (another test process, another checkout's suite) would find and join it: the
    # child gets a temp dir of its own (short: Ray's socket paths must stay under 108 characters).
    env["RAY_TMPDIR"] = ray_tmp = tempfile.mkdtemp(prefix="ray-mn-", dir="/tmp")
    start = time.monotonic()
    try:
        job = subprocess.run([sys.executable, __file__, str(folder), str(out)], env=env, capture_output=True,
                             text=True, timeout=JOB_TIMEOUT_S)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert job.returncode == 0, f"two-node job failed ({time.monotonic() - start:.0f} s):\n{job.stderr[-6000:]}"
    report = pickle.loads(out.read_bytes())
    nodes, ranks = report["nodes"], report["ranks"]
    assert set(nodes) == set(NODE_RESOURCES) and len(set(nodes.values())) == 2, nodes
    # One stage per node: rank r is stage r (tp 1); each sits on its own node of the two.
    assert [r["resources"] for r in ranks] == [{"CPU": 1.0}] * 2, ranks
    assert {r["node_id"] for r in ranks} == set(nodes.values()), (ranks, nodes)
    assert report["batches_in_flight"] == 2  # both stages had a micro-batch at once
    want = helpers.generate(helpers.single_process(pp2_config(folder)), helpers.make_prompts(250, (5, 11, 23, 7)))
    helpers.assert_same_outputs(want, report["result"])


if __name__ == "__main__":
    run_two_node_job(Path(sys.argv[1]), Path(sys.argv[2]))

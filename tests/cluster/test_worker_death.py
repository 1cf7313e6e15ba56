"""A rank of a served TP 2 worker group dies or hangs mid-generation: the clients of the requests in
flight get UNAVAILABLE within 10 s, Serve replaces the replica, and the service answers again (with
the same greedy text as before) within 150 s. The real engine on a tiny random Llama (CPU, gloo)
behind the real Serve app, driven by real clients; nothing in the product is patched.

- SIGKILL of a rank's process (what the OOM killer does), two gRPC streams in flight: both end
  with status UNAVAILABLE naming the dead rank (the driver sees the rank's socket close);
- SIGSTOP of a rank's process (a hang: alive, silent, socket open; its peer then waits in the
  all-reduce), an HTTP stream in flight: the YAML `parallel.step_timeout_s` (5 s) fails the step,
  the stream ends with an OpenAI-shaped error event (code `unavailable`, naming the setting), and the
  stopped process is killed with its group.
Between the failure and the replacement a request reaching the failed replica gets UNAVAILABLE /
503, never another error; one sent while no replica runs waits in Serve's queue for the replacement
(as in a cold start) and is answered by it, so each poll's deadline is what is left of the 150 s.
Health checks run at the default `health_check_period_s` (2 s): Serve's three failed checks in a row
take ~6 s (Serve's own default of 10 s made it ~30 s). Serving again takes ~20 s on an idle 2-core
machine and up to ~80 s while the suite's other xdist worker loads it (CI), hence 150 s, not 60.
The app runs in the session's Ray/Serve (conftest.py `cluster`) and is deleted at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import requests
from ports import free_port
from shardserve.cluster.proto import llm_pb2 as pb
from shardserve.cluster.proto import llm_pb2_grpc as rpc
from test_worker_group import rank_actors, wait_rank_actors_gone, write_tiny_checkpoint

pytestmark = pytest.mark.slow
APP = "death"
MODEL = "tiny-death"
ROUTE = "/death"
STEP_TIMEOUT_S = 5.0
ERROR_WITHIN_S = 10.0
BACK_WITHIN_S = 150.0
# Streams that run for seconds (a few ms per token); the rank is killed right after their first message.
LONG_MAX_TOKENS = 4000
MAX_MODEL_LEN = 4096


def model_section(folder: Path) -> dict:
    return {"name": MODEL, "source": str(folder), "device": "cpu", "dtype": "float32", "max_model_len": MAX_MODEL_LEN,
            "parallel": {"tensor_parallel_size": 2, "step_timeout_s": STEP_TIMEOUT_S, "collective_timeout_s": 120},
            "resources": {"num_cpus_per_worker": 0.25}, "cache": {"cpu_kv_cache_bytes": 16 << 20}}  # fmt: skip


@pytest.fixture(scope="module")
def death_app(cluster, tmp_path_factory) -> Iterator[object]:
    from ray import serve
    from shardserve.cluster.app import build_app
    from shardserve.cluster.config import AppConfig, parse_config

    folder = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llama")
    config_path = folder / "config.json"  # RoPE only: longer contexts than the writer's 256 are fine
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "max_position_embeddings": MAX_MODEL_LEN}))
    port = free_port(taken=(cluster.config.http.port, cluster.config.grpc.port))  # its Ingress's own gRPC port
    config = parse_config({"models": [model_section(folder)], "grpc": {"port": port}}, AppConfig)
    try:
        serve.run(build_app(config), name=APP, route_prefix=ROUTE)
        yield dataclasses.replace(cluster, grpc_target=f"127.0.0.1:{port}")
    finally:
        serve.delete(APP)
        wait_rank_actors_gone()


def rank_pids(timeout_s: float = 60) -> list[int]:
    """Pids of the one live worker group's rank actors (a replaced group's actors may linger briefly)."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        actors = rank_actors()
        if len(actors) == 2:
            with contextlib.suppress(ray.exceptions.RayActorError, ValueError):
                handles = [ray.get_actor(a["name"], namespace=a["namespace"]) for a in actors]
                return [info["pid"] for info in ray.get([h.describe.remote() for h in handles], timeout=30)]
        assert time.monotonic() < deadline, f"expected the 2 rank actors of one group, got {actors}"
        time.sleep(0.5)


def short_request() -> pb.GenerateRequest:
    return pb.GenerateRequest(model=MODEL, prompt="hello", params=pb.SamplingParams(max_tokens=8, temperature=0))


def long_request() -> pb.GenerateRequest:
    params = pb.SamplingParams(max_tokens=LONG_MAX_TOKENS, temperature=0, ignore_eos=True)
    return pb.GenerateRequest(model=MODEL, prompt="doomed", params=params)


def wait_until_served_again(stub: rpc.LLMServiceStub, since: float, old_replica: str, want_text: str) -> float:
    """Poll until a request succeeds on a new replica; every failure meanwhile must be UNAVAILABLE."""
    while True:
        left = BACK_WITHIN_S - (time.monotonic() - since)
        try:
            resp = stub.Generate(short_request(), timeout=max(left, 1.0))
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE, (err.code(), err.details(), f"{left:.0f} s were left")
            assert time.monotonic() - since < BACK_WITHIN_S, f"not served again after {BACK_WITHIN_S} s: {err}"
            time.sleep(0.5)
            continue
        assert resp.replica_id != old_replica, "a request succeeded on the replica whose rank died"
        assert resp.text == want_text and resp.num_tokens == 8
        return time.monotonic() - since


def test_sigkilled_rank_fails_grpc_streams_then_replica_is_replaced(death_app) -> None:
    cluster = death_app
    with grpc.insecure_channel(cluster.grpc_target) as channel:
        stub = rpc.LLMServiceStub(channel)
        before = stub.Generate(short_request(), timeout=60)
        victim = rank_pids()[-1]
        streams = [stub.GenerateStream(long_request(), timeout=120) for _ in range(2)]
        firsts = [next(s) for s in streams]  # both are generating
        assert {f.replica_id for f in firsts} == {before.replica_id}
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        for stream in streams:
            with pytest.raises(grpc.RpcError) as err:
                for _ in stream:
                    pass
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
            assert "worker rank" in err.value.details() and "died" in err.value.details(), err.value.details()
        assert time.monotonic() - killed < ERROR_WITHIN_S
        wait_until_served_again(stub, killed, before.replica_id, before.text)


def test_stalled_rank_fails_http_stream_after_step_timeout_then_replica_is_replaced(death_app, stopped_pids) -> None:
    cluster = death_app
    url = f"{cluster.http_url}{ROUTE}/v1/completions"
    with grpc.insecure_channel(cluster.grpc_target) as channel:
        stub = rpc.LLMServiceStub(channel)
        before = stub.Generate(short_request(), timeout=60)
        victim = rank_pids()[-1]
        body = {"model": MODEL, "prompt": "doomed", "max_tokens": LONG_MAX_TOKENS, "temperature": 0, "stream": True}
        with requests.post(url, json=body, stream=True, timeout=60) as resp:
            assert resp.status_code == 200
            lines = (line for line in resp.iter_lines() if line)
            assert next(lines).startswith(b"data: ")  # generating
            os.kill(victim, signal.SIGSTOP)
            stopped_pids.append(victim)
            stopped = time.monotonic()
            events = [json.loads(line.removeprefix(b"data: ")) for line in lines if line != b"data: [DONE]"]
            elapsed = time.monotonic() - stopped
        assert events and "error" in events[-1], f"the stream ended without an error: {events[-1:]}"
        error = events[-1]["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert error["code"] == "unavailable" and error["type"] == "service_unavailable_error", error
        assert "parallel.step_timeout_s = 5" in error["message"], error
        assert STEP_TIMEOUT_S - 0.5 < elapsed < ERROR_WITHIN_S, f"stream ended {elapsed:.1f} s after the stop"
        r = requests.post(url, json={"model": MODEL, "prompt": "x", "max_tokens": 2}, timeout=BACK_WITHIN_S)
        assert r.status_code == 503 or r.ok, r.text  # dead replica (503) or already its replacement
        wait_until_served_again(stub, stopped, before.replica_id, before.text)
        deadline = time.monotonic() + 30
        while _state(victim) == "T":
            assert time.monotonic() < deadline, f"the stopped rank (pid {victim}) outlived its failed group"
            time.sleep(0.5)


def _state(pid: int) -> str:
    """The process state letter of /proc/<pid>/stat (T = stopped, Z = zombie), '' once it is gone."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]
    return ""


def test_health_check_settings_reach_serve_and_are_range_checked() -> None:
    from shardserve.cluster.app import llm_server_options
    from shardserve.cluster.config import ConfigError, ModelSection, parse_config

    section = ModelSection.model_validate({"name": "m", "health_check_period_s": 3, "health_check_timeout_s": 45})
    options = llm_server_options(0, section)
    assert (options["health_check_period_s"], options["health_check_timeout_s"]) == (3, 45)
    defaults = llm_server_options(0, ModelSection.model_validate({"name": "m"}))
    assert (defaults["health_check_period_s"], defaults["health_check_timeout_s"]) == (2.0, 30.0)
    for field, value, rule in (("health_check_period_s", 0.1, r">= 0\.5"), ("health_check_timeout_s", 4000, r"<= 3600\.0")):
        with pytest.raises(ConfigError, match=rf"models\[0\]\.{field}: must be {rule}, got {value}"):
            parse_config({"models": [{"name": "m", field: value}]})

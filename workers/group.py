"""RayExecutor: one sharded copy of the model as Ray actors in a placement group.

Ray only starts things; it carries no per-step traffic. Start-up:
  1. placement: inside a Serve replica whose deployment reserved `placement_group_bundles`
     (cluster/app.py) the replica's group is used (replica and rank 0 in bundle 0, rank r in
     bundle r); elsewhere the executor reserves world_size bundles, STRICT_PACK with one
     pipeline stage (TP ranks share NVLink), PACK otherwise (stages may span nodes).
  2. one `RankActor` per rank (bundle index = rank), each with a `multiprocessing.connection`
     Listener on its node's IP and a random authkey; rank 0 also picks the rendezvous port.
  3. `RankActor.serve(spec)` runs for the group's whole life: it accepts the driver's connection
     and enters proc.py's `worker_main` (the same loop as MultiprocExecutor). Its ObjectRef is
     the liveness ref: ready only when the rank's loop ends or its actor dies.
Per step (channel.py): the SchedulerOutput is pickled once and written to every rank's socket;
the output rank's ModelRunnerOutput is read back in submission order. No Ray call on the step
path. A killed rank closes its socket (EOF at once); every `LIVENESS_POLL_S` of silence the
liveness refs are checked with a zero-timeout `ray.wait` (a lost node); a hung rank fails the
step after ParallelConfig.step_timeout_s. Either way the step raises WorkerGroupError, every rank
actor is killed, and every later call (and `check_health`) raises too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener
from typing import Any, NoReturn

import ray
from ray.util import get_node_ip_address
from ray.util.placement_group import (
    PlacementGroup,
    get_current_placement_group,
    placement_group,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from shardserve.workers.config import EngineConfig
from shardserve.workers.worker.channel import ConnectionGroup, WorkerGroupError
from shardserve.workers.worker.executor import free_port, ranks_cpu_activations
from shardserve.workers.worker.proc import (
    READY,
    worker_main,
)
from shardserve.workers.worker.worker import RankReady, WorkerSpec, output_rank

LIVENESS_POLL_S = 0.5  # silence on every socket this long -> check the actors through Ray
PLACEMENT_LOG_S = 10.0  # while the placement group is pending, say what it waits for this often
ACTOR_NAME_PREFIX = "shardserve-rank"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankResources:
    """What one rank's actor asks Ray for (num_gpus 0 on CPU, usually 1 on GPU)."""

    num_cpus: float
    num_gpus: float

    def bundle(self) -> dict[str, float]:
        return {k: v for k, v in (("CPU", self.num_cpus), ("GPU", self.num_gpus)) if v > 0}


@dataclass(frozen=True)
class RankAddress:
    """Where a started RankActor listens (`listen`) and, for rank 0, the rendezvous (`node_ip`, `port`)."""

    node_ip: str
    listen: tuple[str, int]
    port: int


class RankActor:
    """One rank in its own Ray worker process (wrapped with `ray.remote` by RayExecutor)."""

    def __init__(self) -> None:
        self._listener: Listener | None = None

    def start(self, authkey: bytes) -> RankAddress:
        node_ip = get_node_ip_address()
        self._listener = Listener((node_ip, 0), family="AF_INET", authkey=authkey)
        return RankAddress(node_ip, self._listener.address, free_port(node_ip))

    def describe(self) -> dict[str, Any]:
        """Where this rank runs and what Ray gave it (answered beside `serve`: max_concurrency 2)."""
        context = ray.get_runtime_context()
        return {"node_id": context.get_node_id(), "node_ip": get_node_ip_address(), "pid": os.getpid(),
                "resources": context.get_assigned_resources()}

    def serve(self, spec: WorkerSpec) -> None:
        """Accept the driver, then run the rank's loop until SHUTDOWN or EOF (exits the process on error)."""
        if self._listener is None:
            raise RuntimeError("RankActor.serve called before start")
        while True:  # a stray client without the authkey is dropped; only the driver gets through
            try:
                conn = self._listener.accept()
                break
            except (AuthenticationError, EOFError):
                continue
        self._listener.close()
        _no_delay(conn)
        worker_main(spec, conn)


def _no_delay(conn: Connection) -> None:
    """Disable Nagle: a large message is sent as header + body, which Nagle would hold back."""
    with socket.socket(fileno=os.dup(conn.fileno())) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _bundle_share(bundle: dict[str, float], taken: dict[str, float]) -> RankResources:
    return RankResources(max(0.0, bundle.get("CPU", 0.0) - taken.get("CPU", 0.0)),
                         max(0.0, bundle.get("GPU", 0.0) - taken.get("GPU", 0.0)))


def default_rank_resources(config: EngineConfig) -> RankResources:
    """One CPU per rank, plus one GPU when the model may run on CUDA and the cluster has GPUs."""
    wants_gpu = config.model.device != "cpu" and ray.cluster_resources().get("GPU", 0) >= 1
    return RankResources(1.0, 1.0 if wants_gpu else 0.0)


class RayExecutor(ConnectionGroup):
    """world_size RankActors driven through one socket Connection each (see channel.py)."""

    liveness_poll_s = LIVENESS_POLL_S

    def __init__(self, config: EngineConfig, resources: RankResources | None = None, backend: str | None = None,
                 startup_timeout_s: float = 600.0) -> None:
        super().__init__(config.parallel.world_size, output_rank(config), config.parallel.step_timeout_s)
        self.config = config
        self.group_id = uuid.uuid4().hex[:8]
        self.actors: list[Any] = []
        self._run_refs: list[Any] = []
        self._pg: PlacementGroup | None = None
        self._owns_pg = False
        if not ray.is_initialized():
            ray.init()
        try:
            self.resources = self._place(resources, startup_timeout_s)
            self._start(backend, startup_timeout_s)
            ready: list[RankReady] = [self._receive(r, READY, startup_timeout_s) for r in range(self.world_size)]
        except BaseException:
            self.shutdown()
            raise
        self.rank_num_blocks: list[int] = [r.num_blocks for r in ready]
        self.num_blocks = min(self.rank_num_blocks)
        self.cpu_activations = ranks_cpu_activations(ready)

    # ---- start-up -----------------------------------------------------------------------

    def _place(self, resources: RankResources | None, timeout_s: float) -> RankResources:
        """Use the caller's placement group (a Serve replica's) or reserve one; the per-rank request."""
        pg = get_current_placement_group()
        if pg is not None:
            specs = pg.bundle_specs
            if len(specs) < self.world_size:
                raise WorkerGroupError(f"the placement group of this process has {len(specs)} bundles; a worker "
                                       f"group of tp x pp = {self.world_size} ranks needs one per rank")
            self._pg = pg
            if resources is not None:
                return resources
            # Bundle 0 holds this process and rank 0; the other bundles hold one rank each.
            shares = [_bundle_share(specs[0], ray.get_runtime_context().get_assigned_resources()),
                      *(_bundle_share(b, {}) for b in specs[1:self.world_size])]
            return RankResources(min(s.num_cpus for s in shares), min(s.num_gpus for s in shares))
        resources = resources or default_rank_resources(self.config)
        strategy = "STRICT_PACK" if self.config.parallel.pipeline_parallel_size == 1 else "PACK"
        bundles = [resources.bundle() or {"CPU": 0.001} for _ in range(self.world_size)]
        self._pg = placement_group(bundles, strategy=strategy, name=f"shardserve-group-{self.group_id}")
        self._owns_pg = True
        ready, deadline = self._pg.ready(), time.monotonic() + timeout_s
        while not ray.wait([ready], timeout=min(PLACEMENT_LOG_S, max(0.0, deadline - time.monotonic())))[0]:
            waiting = f"{self.world_size} bundles of {bundles[0]} ({strategy}); available: {ray.available_resources()}"
            if time.monotonic() >= deadline:
                raise WorkerGroupError(f"could not reserve {waiting} within {timeout_s:.0f} s")
            logger.warning("worker group %s still waiting for %s", self.group_id, waiting)
        return resources

    def _start(self, backend: str | None, timeout_s: float) -> None:
        actor_cls = ray.remote(max_restarts=0, max_task_retries=0, max_concurrency=2)(RankActor)
        for rank in range(self.world_size):
            self.actors.append(actor_cls.options(
                name=f"{ACTOR_NAME_PREFIX}-{self.group_id}-{rank}",
                num_cpus=self.resources.num_cpus,
                num_gpus=self.resources.num_gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self._pg, placement_group_bundle_index=rank),
            ).remote())
        authkey = os.urandom(32)
        try:
            addresses: list[RankAddress] = ray.get([a.start.remote(authkey) for a in self.actors], timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise WorkerGroupError(f"worker actors did not start within {timeout_s:.0f} s") from None
        except ray.exceptions.RayActorError as exc:
            raise WorkerGroupError(f"a worker actor failed to start: {exc}") from None
        master = addresses[0]
        num_threads = max(1, round(self.resources.num_cpus))
        for rank, actor in enumerate(self.actors):
            spec = WorkerSpec(self.config, rank, master.node_ip, master.port, backend, num_threads)
            self._run_refs.append(actor.serve.remote(spec))
        for rank, address in enumerate(addresses):
            try:
                conn = Client(address.listen, family="AF_INET", authkey=authkey)
            except (OSError, EOFError) as exc:
                raise WorkerGroupError(f"could not connect to worker rank {rank} at {address.listen}: {exc!r}") from None
            _no_delay(conn)
            self._add_connection(conn)

    # ---- launcher-specific parts of ConnectionGroup -------------------------------------

    def check_health(self) -> None:
        """Raise WorkerGroupError if a rank failed before or its actor is gone now (one zero-timeout ray.wait)."""
        if self._error is not None:
            raise WorkerGroupError(self._error)
        if self._stopped:
            raise WorkerGroupError("the worker group was shut down")
        ended, _ = ray.wait(self._run_refs, num_returns=1, timeout=0)
        if ended:
            self._fail_dead(self._run_refs.index(ended[0]))

    def shutdown(self, wait_s: float = 5.0) -> None:
        """Ask every rank to stop, wait up to `wait_s` for their loops to end, then kill the actors
        and free the placement group (idempotent). After a failure `wait_s` is 0: ray.kill at once."""
        if self._stopped:
            return
        self._stopped = True
        if wait_s > 0:
            self._ask_ranks_to_stop()
        if ray.is_initialized():
            if self._run_refs and wait_s > 0:
                with contextlib.suppress(Exception):
                    ray.wait(self._run_refs, num_returns=len(self._run_refs), timeout=wait_s)
            for actor in self.actors:
                with contextlib.suppress(Exception):
                    ray.kill(actor, no_restart=True)
            if self._owns_pg and self._pg is not None:
                with contextlib.suppress(Exception):
                    remove_placement_group(self._pg)
        for conn in self._conns:
            conn.close()

    def __del__(self) -> None:
        if hasattr(self, "_stopped"):
            with contextlib.suppress(Exception):
                self.shutdown()

    def _fail_dead(self, rank: int) -> NoReturn:
        """Rank `rank`'s socket closed or its liveness ref resolved: say why, as far as Ray knows in 2 s."""
        cause = "its connection closed"
        try:
            ready, _ = ray.wait([self._run_refs[rank]], timeout=2.0)
            if ready:
                ray.get(ready[0])
                cause = "its loop returned"
        except ray.exceptions.RayActorError as exc:
            cause = str(exc).strip().splitlines()[0][:300]
        except Exception as exc:  # Ray itself unreachable: the socket's verdict stands
            cause += f" (Ray: {exc!r:.200})"
        self._fail(f"worker rank {rank} (actor {ACTOR_NAME_PREFIX}-{self.group_id}-{rank}) died: {cause}")

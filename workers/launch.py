"""make_executor: the executor of an engine config, by world size and launcher.

The engine asks for one executor at start-up. A world of one runs the model in the engine's own
process (LocalExecutor); otherwise `config.parallel.launcher` picks local worker processes
(MultiprocExecutor, workers/worker/executor.py) or Ray actors in a placement group (RayExecutor,
workers/group.py, imported only when asked for: it imports ray). It sits above both launchers so
that neither imports the other.
"""

from __future__ import annotations

import logging

import torch
from shardserve.workers.config import EngineConfig
from shardserve.workers.models.loader import LoadedModel
from shardserve.workers.worker.channel import WorkerGroupError
from shardserve.workers.worker.executor import Executor, LocalExecutor, MultiprocExecutor

logger = logging.getLogger(__name__)
STARTUP_ATTEMPTS = 3  # worker-group start-ups that lost their rendezvous port are tried again


def make_executor(config: EngineConfig, loaded: LoadedModel | None, device: torch.device) -> Executor:
    """LocalExecutor for a world of one (needs `loaded`); else by `config.parallel.launcher`:
    MultiprocExecutor (`multiproc`) or the Ray worker group of workers/group.py (`ray`)."""
    if config.parallel.world_size == 1:
        if loaded is None or loaded.model is None:
            raise ValueError("a single-process engine needs the loaded model")
        return LocalExecutor(loaded, config, device)
    if config.parallel.launcher == "ray":
        from shardserve.workers.group import RayExecutor  # imports ray: only when asked for

        return RayExecutor(config)
    for attempt in range(STARTUP_ATTEMPTS):
        try:
            return MultiprocExecutor(config)
        except WorkerGroupError as exc:
            # free_port() only finds a port that was free a moment ago: another process (often
            # a gloo connection's ephemeral port) can take it before rank 0's store listens.
            if "address already in use" not in str(exc) or attempt == STARTUP_ATTEMPTS - 1:
                raise
            logger.warning("worker group start-up lost its rendezvous port to another process; retrying")
    raise AssertionError("unreachable")

"""Prefix-affinity request router for LLMServer deployments (a Ray Serve RequestRouter).

Data flow: every DeploymentHandle call to an LLMServer (made by the Ingress) becomes a
PendingRequest whose first argument is a `GenerateRequest`. `choose_replicas` hashes its
`routing_text` in chunks of `PREFIX_CHUNK_CHARS` characters, each chained with the previous one
(like the KV cache's block hashes), and looks the chain up longest-first in a table of which
replica last served that prefix. A replica found whose load exceeds the least-loaded one's by no
more than `max_load_imbalance` is ranked first ("affinity hit"); otherwise replicas are ranked by
load, then by how few prefixes they own, so new prefixes spread. Serve tries the ranks in order.
`on_request_routed` (or `on_direct_stream`, for a `pick_direct` the Ingress sent over its direct
stream) records the replica's prefix chain and counts the request in flight until its call completes.
Other calls (stats, health) go to the least-loaded replica, or to the one a `replica_id=` names.
Load = requests in flight from this router, counted exactly (why not Serve's counts:
`_count_in_flight`). With several Ingress replicas each router balances its own share; Serve's
`max_ongoing_requests` still makes a full replica refuse a handle call. Each router registers itself under its
deployment name; `router_stats(name)` (the Ingress's /v1/stats) reports per replica the requests
routed (direct), affinity hits, load and the engine stats the replica reports (record_routing_stats).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica
from shardserve.cluster.messages import GenerateRequest

PREFIX_CHUNK_CHARS = 64  # one "block" of routing text (~16 tokens of English)
MAX_PREFIX_ENTRIES = 100_000  # LRU bound of the prefix table
MAX_PENDING_DECISIONS = 10_000  # bound of choices whose request was never routed (cancelled meanwhile)

_ROUTERS: dict[str, PrefixAffinityRouter] = {}


def prefix_chain(text: str, chunk_chars: int = PREFIX_CHUNK_CHARS) -> list[str]:
    """Chained hashes of the text's leading chunks; the last may be a partial chunk.

    `surrogatepass`: any Python str hashes, even one holding a lone surrogate (JSON's "\\ud800"),
    which plain UTF-8 cannot encode; an exception here would stall Serve's routing of the request.
    """
    chain, prev = [], ""
    for start in range(0, len(text), chunk_chars):
        data = (prev + text[start : start + chunk_chars]).encode("utf-8", "surrogatepass")
        prev = hashlib.blake2b(data, digest_size=12).hexdigest()
        chain.append(prev)
    return chain


def running_replica_ids(deployment_name: str) -> list[str] | None:
    """Ids of the deployment's running replicas as this process's router knows them (None: no router
    yet, i.e. no call through a handle to that deployment from this process so far)."""
    router = _ROUTERS.get(deployment_name)
    return None if router is None else [r.replica_id.unique_id for r in router._replicas.values()]


def router_of(deployment_name: str) -> PrefixAffinityRouter | None:
    """This process's router of the deployment (None before the first handle call to it)."""
    return _ROUTERS.get(deployment_name)


def router_stats(deployment_name: str) -> dict[str, Any] | None:
    router = _ROUTERS.get(deployment_name)
    return None if router is None else router.stats()


@dataclass
class Pick:
    """A routing decision: replicas best first; the request's prefix chain and the replica that owned
    it (both None without prefix affinity)."""

    ranked: list[RunningReplica]
    chain: list[str] | None
    affinity: ReplicaID | None


class PrefixAffinityRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, prefix_affinity: bool = True, max_load_imbalance: int = 8) -> None:
        self._prefix_affinity = prefix_affinity
        self._max_load_imbalance = max_load_imbalance
        self._owner: OrderedDict[str, ReplicaID] = OrderedDict()  # prefix hash -> replica
        self._num_owned: dict[ReplicaID, int] = {}
        self._in_flight: dict[ReplicaID, int] = {}
        self._num_routed: dict[ReplicaID, int] = {}
        self._num_affinity_hits: dict[ReplicaID, int] = {}
        self._num_direct: dict[ReplicaID, int] = {}  # of those routed, sent over the direct stream
        # internal id -> (chain, affinity), from choose_replicas until on_request_routed
        self._decisions: OrderedDict[str, tuple[list[str], ReplicaID | None]] = OrderedDict()
        if self._deployment_id is not None:
            # Ray Serve ships this class pickled by value, so its module globals are a copy:
            # register in the module as imported in this process, where router_stats() looks.
            # The first router of a deployment in this process is the Ingress's own; a short-lived
            # one (cluster/ingress/wake.py) must not take its place.
            from shardserve.cluster import router as module

            module._ROUTERS.setdefault(self._deployment_id.name, self)

    # ---- policy ---------------------------------------------------------------------------
    def _load(self, replica: RunningReplica) -> int:
        return self._in_flight.get(replica.replica_id, 0)

    def _affinity(self, chain: list[str], candidates: set[ReplicaID]) -> ReplicaID | None:
        for key in reversed(chain):
            owner = self._owner.get(key)
            if owner is not None and owner in candidates:
                return owner
        return None

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if pending_request is not None:
            # Back off between rounds when every ranked replica refused (queues full).
            pending_request.routing_context.should_backoff = True
        if not candidate_replicas:
            return []
        request = _generate_request(pending_request)
        if request is None:
            ranked = self._by_load(candidate_replicas)
            pinned = _pinned_replica(pending_request)
            ranked.sort(key=lambda r: r.replica_id.unique_id != pinned)
            return [[r] for r in ranked]
        pick = self._rank(candidate_replicas, request)
        if pick.chain is not None:
            internal_id = pending_request.metadata.internal_request_id
            self._decisions.pop(internal_id, None)
            self._decisions[internal_id] = (pick.chain, pick.affinity)
            while len(self._decisions) > MAX_PENDING_DECISIONS:
                self._decisions.popitem(last=False)
        return [[r] for r in pick.ranked]

    def _by_load(self, candidates: list[RunningReplica]) -> list[RunningReplica]:
        return sorted(
            candidates, key=lambda r: (self._load(r), self._num_owned.get(r.replica_id, 0), r.replica_id.unique_id)
        )

    def _rank(self, candidates: list[RunningReplica], request: GenerateRequest) -> Pick:
        """The replicas for `request`, best first: by load, the affinity replica first unless too loaded."""
        ranked = self._by_load(candidates)
        request.stamps["routed"] = time.time()  # the replica pick, for the LLMServer's trace
        if not self._prefix_affinity:
            return Pick(ranked, None, None)
        chain = prefix_chain(request.routing_text)
        affinity = self._affinity(chain, {r.replica_id for r in candidates})
        if affinity is not None:
            loads = {r.replica_id: self._load(r) for r in candidates}
            if loads[affinity] - min(loads.values()) <= self._max_load_imbalance:
                ranked.sort(key=lambda r: r.replica_id != affinity)
        return Pick(ranked, chain, affinity)

    def pick_direct(self, request: GenerateRequest) -> Pick | None:
        """Rank the running replicas for `request` as a handle call would (None: none known yet), for the
        Ingress's direct stream (cluster/ingress/direct.py); book the one it sends to with `on_direct_stream`
        before it next awaits (the replica set changes only on this loop)."""
        if not self._replicas:
            return None
        return self._rank(list(self._replicas.values()), request)

    # ---- bookkeeping ----------------------------------------------------------------------
    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        self._count_in_flight(replica_id, result)
        decision = self._decisions.pop(pending_request.metadata.internal_request_id, None)
        if decision is not None:
            self._record(replica_id, *decision)

    def on_direct_stream(self, pick: Pick, call: Any) -> None:
        """`pick`'s first replica took the request over the direct stream: in flight until `call` completes."""
        replica_id = pick.ranked[0].replica_id
        self._num_direct[replica_id] = self._num_direct.get(replica_id, 0) + 1
        self._count_in_flight(replica_id, call)
        if pick.chain is not None:
            self._record(replica_id, pick.chain, pick.affinity)

    def _record(self, replica_id: ReplicaID, chain: list[str], affinity: ReplicaID | None) -> None:
        """The request's prefix chain is `replica_id`'s now."""
        self._num_routed[replica_id] = self._num_routed.get(replica_id, 0) + 1
        if affinity == replica_id:
            self._num_affinity_hits[replica_id] = self._num_affinity_hits.get(replica_id, 0) + 1
        for key in chain:
            previous = self._owner.pop(key, None)
            if previous is not None:
                self._num_owned[previous] -= 1
            self._owner[key] = replica_id
            self._num_owned[replica_id] = self._num_owned.get(replica_id, 0) + 1
        while len(self._owner) > MAX_PREFIX_ENTRIES:
            _, evicted = self._owner.popitem(last=False)
            self._num_owned[evicted] -= 1

    def _count_in_flight(self, replica_id: ReplicaID, result: Any) -> None:
        """Count one request on `replica_id` until this accepted attempt's own result completes.

        Runs on the router's event loop; the done callback may fire on another thread (or at
        once, if the request already finished), so the release is posted back to this loop.

        Why not Serve's own counts: its queue-length cache is set from the count a replica reports
        when it accepts a request and can land *after* that request's completion decremented it
        (an idle replica looks busy until the entry expires); and `on_request_completed(replica,
        internal_id)` leaks a count when the completion runs before the router loop resumes after
        the accept, and cannot tell a rejected attempt from an accepted retry. Either way one
        replica looks permanently loaded and gets no new prefixes.
        """
        self._in_flight[replica_id] = self._in_flight.get(replica_id, 0) + 1
        loop = asyncio.get_running_loop()

        def finished(_: Any) -> None:
            with contextlib.suppress(RuntimeError):  # a closed loop: this router is gone
                loop.call_soon_threadsafe(self._release, replica_id)

        result.add_done_callback(finished)

    def _release(self, replica_id: ReplicaID) -> None:
        if replica_id in self._in_flight:  # else forgotten: the replica left the deployment
            self._in_flight[replica_id] = max(0, self._in_flight[replica_id] - 1)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._forget(replica_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        live = {r.replica_id for r in replicas}
        for replica_id in (set(self._num_owned) | set(self._in_flight)) - live:
            self._forget(replica_id)

    def _forget(self, replica_id: ReplicaID) -> None:
        for key in [k for k, owner in self._owner.items() if owner == replica_id]:
            del self._owner[key]
        self._num_owned.pop(replica_id, None)
        self._in_flight.pop(replica_id, None)

    def stats(self) -> dict[str, Any]:
        replicas = {}
        for replica in self._replicas.values():
            rid = replica.replica_id
            replicas[rid.unique_id] = {
                "num_routed": self._num_routed.get(rid, 0),
                "num_affinity_hits": self._num_affinity_hits.get(rid, 0),
                "num_direct_streams": self._num_direct.get(rid, 0),
                "num_in_flight": self._in_flight.get(rid, 0),
                "num_prefixes_owned": self._num_owned.get(rid, 0),
                "engine": dict(replica.routing_stats or {}),
            }
        return {
            "policy": "prefix_affinity" if self._prefix_affinity else "least_loaded",
            "max_load_imbalance": self._max_load_imbalance,
            "replicas": replicas,
        }


def _generate_request(pending_request: PendingRequest | None) -> GenerateRequest | None:
    if pending_request is None:
        return None
    for arg in pending_request.args:
        if isinstance(arg, GenerateRequest):
            return arg
    return None


def _pinned_replica(pending_request: PendingRequest | None) -> str | None:
    """A control call's `replica_id=` keyword (e.g. LLMServer.recent_requests): that replica first,
    so a caller can read every replica's state through the handle."""
    if pending_request is None:
        return None
    pinned = pending_request.kwargs.get("replica_id")
    return pinned if isinstance(pinned, str) else None

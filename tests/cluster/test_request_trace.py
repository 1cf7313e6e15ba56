"""The per-hop trace of a request's first token (LLMServer.recent_requests, cluster/server.py `_Trace`).

One real GenerateStream through the real app: its entry names every stamp benchmarks/serve_latency.py
reads, on one clock and in the order the request passed them (no durations are checked).
"""

from __future__ import annotations

import grpc
import pytest
from real_app import llm_handle
from shardserve.cluster.proto import llm_pb2 as pb
from shardserve.cluster.proto import llm_pb2_grpc as rpc

pytestmark = pytest.mark.slow

ORDER = ("ingress_unix_s", "router_pick_unix_s", "server_receive_unix_s", "engine_arrival_unix_s", "engine_first_token_unix_s",
         "server_first_yield_unix_s")
# The engine's monotonic stamps are moved onto the wall clock when the request finishes; allow that
# conversion a little slack, far below any hop.
SLACK_S = 1e-4


def test_first_token_trace_is_ordered(real):
    rid = "trace-order-1"
    req = pb.GenerateRequest(model="smollm2", prompt_token_ids=pb.TokenIds(ids=[101, 102, 103, 104]),
                             params=pb.SamplingParams(max_tokens=3, ignore_eos=True, temperature=0))  # fmt: skip
    with grpc.insecure_channel(real.grpc_target) as channel:
        parts = list(rpc.LLMServiceStub(channel).GenerateStream(req, metadata=(("x-request-id", rid),)))
    replica = parts[0].replica_id
    reply = llm_handle().recent_requests.remote(replica_id=replica).result(timeout_s=30)
    assert reply["replica_id"] == replica
    entry = reply["requests"][rid]
    stamps = [entry[name] for name in ORDER]
    assert all(isinstance(s, float) for s in stamps), entry
    for i in range(len(ORDER) - 1):
        assert stamps[i] <= stamps[i + 1] + SLACK_S, f"{ORDER[i]} after {ORDER[i + 1]}: {entry}"
    ttft = entry["engine_first_token_unix_s"] - entry["engine_arrival_unix_s"]
    assert entry["engine_ttft_s"] == pytest.approx(ttft, abs=SLACK_S)

"""gRPC stubs of shardserve.v1, generated from the .proto files on first use.

Data flow: `from shardserve.cluster.proto import llm_pb2, llm_pb2_grpc` checks that
cluster/proto/gen/ is present and not older than the .proto files, runs build.py if it is (the
Makefile's `proto` target does the same at install time), then imports the generated modules.
The Ingress's own gRPC server registers the service (cluster/ingress/grpc_server.py); the
standard health and reflection services come from their registry packages, not from here.
"""

from __future__ import annotations

import importlib
from types import ModuleType

_STUBS = ("llm_pb2", "llm_pb2_grpc")


def ensure_stubs() -> None:
    from shardserve.cluster.proto import build

    if build.is_stale():
        build.build()


def __getattr__(name: str) -> ModuleType:
    if name not in _STUBS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    ensure_stubs()
    return importlib.import_module(f"{__name__}.gen.shardserve.v1.{name}")


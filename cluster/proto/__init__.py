"""gRPC stubs of shardserve.v1, generated from the .proto files on first use.

Data flow: `from shardserve.cluster.proto import llm_pb2, llm_pb2_grpc` (or
`add_LLMServiceServicer_to_server`, the function Ray Serve's gRPC proxy is given) checks that
cluster/proto/gen/ is present and not older than the .proto files, runs build.py if it is (the
Makefile's `proto` target does the same at install time), then imports the generated modules.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

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


def add_LLMServiceServicer_to_server(servicer: Any, server: Any) -> None:  # noqa: N802 (gRPC's name)
    # Serve's gRPC proxy calls this with its server: make its streaming handlers cancel-safe, and
    # let undecodable request bytes reach the Ingress as INVALID_ARGUMENT (cluster/ingress/grpc_decode.py).
    from shardserve.cluster.ingress.grpc_decode import tolerant_registration
    from shardserve.cluster.serve_fixes import cancel_safe_streaming

    cancel_safe_streaming(server)
    __getattr__("llm_pb2_grpc").add_LLMServiceServicer_to_server(servicer, tolerant_registration(server))


SERVICER_FUNCTION = f"{__name__}.add_LLMServiceServicer_to_server"

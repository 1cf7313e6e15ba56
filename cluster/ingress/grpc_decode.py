"""Undecodable gRPC requests become INVALID_ARGUMENT instead of grpc's UNKNOWN.

Data flow: the Ingress's grpc.aio server (cluster/ingress/grpc_server.py) parses each call's bytes
with the `request_deserializer` of the handlers registered for LLMService, before any of our code
runs; when `GenerateRequest.FromString` raises (corrupt wire format, a string field that is not
UTF-8), grpc-aio ends the call with UNKNOWN. `tolerant_registration(server)` wraps the server
while the generated `add_LLMServiceServicer_to_server` registers, so each handler parses with
`_tolerant(parse)`: a `DecodeError` yields an `UndecodableRequest` (what failed, in a few words)
in place of the message. GrpcFrontend answers it with INVALID_ARGUMENT naming the method.
ListModels and Health ignore their (empty) request message, so they answer as usual.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError

MAX_REASON_CHARS = 120


@dataclass(frozen=True)
class UndecodableRequest:
    """Stands in for a request message whose bytes did not parse."""

    method: str  # e.g. /shardserve.v1.LLMService/Generate
    reason: str  # protobuf's error, e.g. "String field had bad UTF-8"

    def message(self) -> str:
        return f"request is not a valid protobuf message for {self.method}: {self.reason}"


def _tolerant(method: str, parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse_or_mark(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as err:
            reason = str(err).rsplit(": ", 1)[-1][:MAX_REASON_CHARS]
            return UndecodableRequest(method, reason)

    return parse_or_mark


def _tolerant_handlers(handlers: dict[str, Any], service: str = "") -> dict[str, Any]:
    out = {}
    for name, handler in handlers.items():
        method = name if name.startswith("/") else f"/{service}/{name}"
        parse = handler.request_deserializer
        out[name] = (
            handler if parse is None else handler._replace(request_deserializer=_tolerant(method, parse))
        )
    return out


class tolerant_registration:  # noqa: N801 -- reads as a function at the call site
    """The proxy's server, as seen by the generated `add_*Servicer_to_server`: handlers parse tolerantly."""

    def __init__(self, server: Any) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, generic_handlers: Any) -> None:
        for generic in generic_handlers:
            if isinstance(getattr(generic, "_method_handlers", None), dict):
                generic._method_handlers = _tolerant_handlers(generic._method_handlers)
        self._server.add_generic_rpc_handlers(generic_handlers)

    def add_registered_method_handlers(self, service: str, method_handlers: dict[str, Any]) -> None:
        add = getattr(self._server, "add_registered_method_handlers", None)
        if add is not None:
            add(service, _tolerant_handlers(method_handlers, service))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)

"""Error mapping of the ingress: one `ApiError` type, rendered as OpenAI JSON or a gRPC status.

Data flow: anything that rejects a request — request-body validation, SamplingParams' own
ValueError (whose message starts with the field name), an unknown model, an `ErrorInfo` chunk
from an LLMServer, or Ray Serve failing to reach a replica — becomes an `ApiError(kind,
message, param)`. The HTTP ingress renders it as `{"error": {"message", "type", "param",
"code"}}` with the status below; the gRPC servicer sets the matching status code and details.
"""

from __future__ import annotations

from typing import Any

import grpc
from shardserve.cluster.messages import ErrorInfo, ErrorKind

HTTP_STATUS = {
    ErrorKind.INVALID_ARGUMENT: 400,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.UNAUTHENTICATED: 401,
    ErrorKind.QUEUE_FULL: 429,
    ErrorKind.RATE_LIMITED: 429,
    ErrorKind.UNAVAILABLE: 503,
    ErrorKind.INTERNAL: 500,
}
OPENAI_TYPE = {
    ErrorKind.INVALID_ARGUMENT: "invalid_request_error",
    ErrorKind.NOT_FOUND: "not_found_error",
    ErrorKind.UNAUTHENTICATED: "invalid_request_error",
    ErrorKind.QUEUE_FULL: "rate_limit_error",
    ErrorKind.RATE_LIMITED: "rate_limit_error",
    ErrorKind.UNAVAILABLE: "service_unavailable_error",
    ErrorKind.INTERNAL: "internal_error",
}
GRPC_STATUS = {
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorKind.QUEUE_FULL: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.RATE_LIMITED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}


class ApiError(Exception):
    def __init__(self, kind: ErrorKind, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.param = param

    def __reduce__(self) -> tuple[type, tuple[ErrorKind, str, str | None]]:
        # Ray pickles exceptions between the ingress and the proxies: keep all three fields.
        return (ApiError, (self.kind, self.message, self.param))

    @classmethod
    def from_info(cls, info: ErrorInfo) -> ApiError:
        return cls(info.kind, info.message, info.param)

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.kind]

    @property
    def grpc_status(self) -> grpc.StatusCode:
        return GRPC_STATUS[self.kind]

    def openai_body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": OPENAI_TYPE[self.kind],
                "param": self.param,
                "code": self.kind.value,
            }
        }


def unknown_model(name: str, served: list[str]) -> ApiError:
    return ApiError(ErrorKind.NOT_FOUND, f"model {name!r} does not exist; served models: {served}", "model")


def from_serve_exception(err: BaseException) -> ApiError | None:
    """Map Ray Serve's own failures (no replica, backpressure, dead actor) to an ApiError."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    if isinstance(err, BackPressureError):
        return ApiError(ErrorKind.QUEUE_FULL, f"too many queued requests: {err}")
    if isinstance(err, (DeploymentUnavailableError, ActorDiedError, ActorUnavailableError, RayActorError)):
        return ApiError(ErrorKind.UNAVAILABLE, f"no healthy replica: {type(err).__name__}")
    return None

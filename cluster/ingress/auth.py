"""API-key check shared by the HTTP and gRPC front ends.

Data flow: when the environment variable `SHARDSERVE_API_KEY` is set in the Ingress process
(the Helm chart passes it from a Secret; Ray hands a pod's environment to its actors), every
HTTP route but /health needs `Authorization: Bearer <key>` and every gRPC call but Health needs
the metadata `authorization: Bearer <key>`. `check(header)` raises an UNAUTHENTICATED ApiError
(HTTP 401 in the OpenAI error shape, gRPC UNAUTHENTICATED) otherwise. The key is compared in
constant time and never echoed.
"""

from __future__ import annotations

import hmac
import os

from shardserve.cluster.ingress.errors import ApiError
from shardserve.cluster.messages import ErrorKind

API_KEY_ENV = "SHARDSERVE_API_KEY"
OPEN_HTTP_PATHS = frozenset({"/health"})


def api_key() -> str | None:
    """The configured key, or None when the API is open (read each call: cheap, and testable)."""
    return os.environ.get(API_KEY_ENV) or None


def check(authorization: str | None) -> None:
    key = api_key()
    if key is None:
        return
    scheme, _, token = (authorization or "").strip().partition(" ")
    if not authorization:
        raise ApiError(ErrorKind.UNAUTHENTICATED, "missing API key: send `Authorization: Bearer <key>`")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ApiError(ErrorKind.UNAUTHENTICATED, "invalid API key (expected `Authorization: Bearer <key>`)")

"""Where and what to send: the endpoints of a run and the sampling settings every request carries.

Data flow: options.py builds them from the flags; clients.py opens one connection per `Endpoint`
and puts `ClientSettings` into every request body / message.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Endpoint:
    """label: the name in tables and plots; scheme: http, https, grpc or grpcs; url: the base URL
    (HTTP, ending in /v1/completions) or host:port (gRPC)."""

    label: str
    scheme: str
    url: str


@dataclass(frozen=True)
class ClientSettings:
    model: str
    ignore_eos: bool = True
    temperature: float = 0.0
    api_key: str | None = None
    timeout_s: float = 600.0

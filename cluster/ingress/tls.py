"""TLS material of the config's `tls` section, for the two servers that use it.

Data flow: without client authentication, `serve_options` (cluster/app.py) passes
`http_ssl_options(tls)` to Ray Serve's HTTPOptions (`ssl_certfile`, `ssl_keyfile`, `ssl_ca_certs`:
uvicorn in Serve's HTTP proxy serves HTTPS). With `require_client_auth` (`ingress_serves_http`) Serve
starts no HTTP proxy and each Ingress replica serves HTTPS itself with client certificates required
(cluster/ingress/http_server.py). The Ingress's gRPC server (cluster/ingress/grpc_server.py) binds its port with
`grpc_credentials(tls)`: `grpc.ssl_server_credentials` with the CA as root certificates and
`require_client_auth` for mutual TLS. Files are read where the servers run; a missing or unreadable
file is a ConfigError naming the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
from shardserve.cluster.config import ConfigError, TlsSection


def read_pem(tls: TlsSection, field: str) -> bytes:
    path = Path(getattr(tls, field))
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"tls.{field}: cannot read {path}: {err.strerror}") from None
    if b"-----BEGIN" not in data:
        raise ConfigError(f"tls.{field}: {path} is not a PEM file")
    return data


def check_files(tls: TlsSection) -> None:
    for field in ("cert_file", "key_file", "ca_file"):
        if getattr(tls, field) is not None:
            read_pem(tls, field)


def ingress_serves_http(tls: TlsSection | None) -> bool:
    """Mutual TLS: the Ingress replicas serve HTTP themselves (Serve's proxy cannot require client
    certificates), and Serve starts no HTTP proxy."""
    return tls is not None and tls.require_client_auth


def http_ssl_options(tls: TlsSection | None) -> dict[str, Any]:
    """Serve HTTP proxy's HTTPS options (server-side TLS only; none when the Ingress serves HTTP)."""
    if tls is None or ingress_serves_http(tls):
        return {}
    check_files(tls)
    options = {"ssl_certfile": tls.cert_file, "ssl_keyfile": tls.key_file}
    if tls.ca_file is not None:
        options["ssl_ca_certs"] = tls.ca_file
    return options


def grpc_credentials(tls: TlsSection) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(read_pem(tls, "key_file"), read_pem(tls, "cert_file"))],
        root_certificates=read_pem(tls, "ca_file") if tls.ca_file is not None else None,
        require_client_auth=tls.require_client_auth,
    )

"""`shardserve probe URL [--cert F --key F]`: exit 0 when GET URL answers 200, else 1 (a Kubernetes exec probe).

Data flow: the Helm chart's readiness probe of the head pod runs, with mutual TLS, `shardserve probe
https://127.0.0.1:<http.port>/health --cert tls.crt --key tls.key`: an httpGet probe cannot present a
client certificate, and the Ingress refuses clients without one at the TLS handshake. The server's
certificate is not verified (the probe talks to its own pod), the client certificate is presented.
The standard library only (http.client, ssl): a probe runs every few seconds and must start fast.
"""

from __future__ import annotations

import argparse
import http.client
import ssl
import sys
from urllib.parse import urlsplit

TIMEOUT_S = 5.0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("probe", help="GET a URL (optionally with a client certificate); exit 0 on 200.")
    parser.add_argument("url", help="http:// or https:// URL, e.g. https://127.0.0.1:8000/health")
    parser.add_argument("--cert", help="PEM client certificate to present (mutual TLS)")
    parser.add_argument("--key", help="PEM private key of --cert")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds (default %(default)s)")
    parser.set_defaults(func=run)


def probe(url: str, cert: str | None = None, key: str | None = None, timeout: float = TIMEOUT_S) -> tuple[int, str]:
    """(HTTP status, first 200 characters of the body) of GET url."""
    parts = urlsplit(url)
    if parts.scheme == "https":
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # our own pod's server
        if cert is not None:
            context.load_cert_chain(cert, key)
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(parts.netloc, timeout=timeout, context=context)
    elif parts.scheme == "http":
        conn = http.client.HTTPConnection(parts.netloc, timeout=timeout)
    else:
        raise ValueError(f"url: scheme must be http or https, got {parts.scheme!r}")
    try:
        conn.request("GET", parts.path or "/")
        response = conn.getresponse()
        return response.status, response.read(200).decode("utf-8", "replace")
    finally:
        conn.close()


def run(args: argparse.Namespace) -> int:
    if (args.cert is None) != (args.key is None):
        print("probe: give both --cert and --key, or neither", file=sys.stderr)
        return 2
    try:
        status, body = probe(args.url, args.cert, args.key, args.timeout)
    except (OSError, ValueError) as err:  # refused, TLS handshake failed, timed out, bad URL
        print(f"probe {args.url}: {err}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"probe {args.url}: HTTP {status}: {body}", file=sys.stderr)
        return 1
    return 0

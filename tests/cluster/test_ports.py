"""The suite never binds the default ports 8000 / 9000 (issue 20, item 9).

tests/conftest.py holds them for the whole session; this checks that the hold is in force while the
shared test cluster (HTTP and gRPC proxies on free ports) is up, so a test that starts a proxy on a
default port fails instead of colliding with a developer's `make serve`.
"""

from __future__ import annotations

import socket
from urllib.parse import urlparse

import pytest

pytestmark = pytest.mark.slow


def test_cluster_uses_free_ports_and_defaults_stay_held(cluster, default_ports_held):
    http_port = urlparse(cluster.http_url).port
    grpc_port = int(cluster.grpc_target.rsplit(":", 1)[1])
    assert {http_port, grpc_port}.isdisjoint({8000, 9000})
    for port in default_ports_held:
        with socket.socket() as sock, pytest.raises(OSError):
            sock.bind(("0.0.0.0", port))

"""Free TCP ports for local Ray/Serve test clusters, picked where nothing else will take them.

Ports from `bind(0)` come from the kernel's ephemeral range, where every outgoing connection and
`bind(0)` of Ray's many processes also lands, so such a port can be taken between the pick and
Serve's proxy binding it. These come from above Ray's worker ports (10002-19999) and below the
ephemeral range instead.
"""

from __future__ import annotations

import random
import socket


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


PORT_RANGE = (20000, max(20001, min(_ephemeral_low(), 32768)))


def free_port(taken: tuple[int, ...] = ()) -> int:
    """A port in PORT_RANGE that is free now and not in `taken`."""
    for _ in range(200):
        port = random.randrange(*PORT_RANGE)
        if port in taken:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in {PORT_RANGE} after 200 tries")

"""Free TCP ports, for the listeners this app and its tests start (NIXL side channels,
HAProxy's side listeners, test servers)."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the OS picks it; a race with another process is
    possible but needs that process to pick the same port in the meantime)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]

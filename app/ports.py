"""Free TCP ports, for the listeners this app and its tests start (NIXL side channels,
KV-event sockets, HAProxy's side listeners, test servers)."""

from __future__ import annotations

import random
import socket

# Ports a replica hands to a listener that binds *later* (vLLM's NIXL side channel and
# KV-event publisher bind in their own threads, with no retry). Below Linux's ephemeral
# range (32768+ by default): an outgoing connection never takes one in the meantime, which
# happened with ephemeral picks while four engines started at once (the side channel's bind
# failed and its engine hung). Above Ray's worker ports (10002-19999), below Ray Serve's
# direct-ingress HTTP ports (30000+).
LISTEN_RANGE = (20000, 30000)
# Ports this process has handed out: each is bound later, so a second pick would find it
# still free (seen: a decode replica gave its KV-event publisher the port it had given its
# NIXL side channel; the side channel's bind failed and the engine hung at start).
_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, from the OS's ephemeral range: any outgoing connection
    may take it before it is bound, so a listener bound later (a server, HAProxy, Ray's
    metrics agent) gets ``listen_port`` instead."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def listen_port(host: str = "0.0.0.0", rng: random.Random | None = None,
                tries: int = 200) -> int:
    """A port for a listener bound later by someone else: free now, outside the ephemeral
    range (see ``LISTEN_RANGE``), and never handed out before by this process."""
    rng = rng or random.SystemRandom()
    lo, hi = LISTEN_RANGE
    for _ in range(tries):
        port = rng.randrange(lo, hi)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    return free_port(host)

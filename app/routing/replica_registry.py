"""Per-process registry of live replicas, filled by the pool request routers.

Ray Serve keeps every handle's replica set current through its long-poll; the pool routers
(:mod:`app.routing.pool_routers`) copy it here so that the ingress router, in the same process,
sees replicas come and go with their advertised endpoints, without polling anything itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Replicas = dict[str, dict[str, Any]]  # full replica id -> replica metadata
Listener = Callable[[str, Replicas], None]

_replicas: dict[str, Replicas] = {}  # deployment name -> its replicas
_listeners: list[Listener] = []


def on_change(listener: Listener) -> None:
    """Call ``listener(deployment, replicas)`` now for what is known, then on every change."""
    _listeners.append(listener)
    for deployment, replicas in list(_replicas.items()):
        listener(deployment, dict(replicas))


def publish(deployment: str, replicas: Replicas) -> None:
    if _replicas.get(deployment) == replicas:
        return
    _replicas[deployment] = dict(replicas)
    for listener in list(_listeners):
        listener(deployment, dict(replicas))


def snapshot() -> dict[str, Replicas]:
    return {d: dict(r) for d, r in _replicas.items()}

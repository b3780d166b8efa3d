"""Push: a prefill engine tells decode when a registration comes too late to be served.

Under push, decode allocates a request's blocks and registers them with the prefill engine;
prefill WRITEs the KV once its request has finished. vLLM keeps a finished request's blocks
on prefill for the KV lease (``nixl.kv_lease_s``) only. A registration that arrives after
that (decode admitted the leg late: an overloaded or stalled decode engine) matched nothing
and was kept on prefill for good, and decode waited for a WRITE that could not come: the
request hung (a whole, non-streamed one without limit) and decode's blocks stayed held, even
once the front had given up on the leg. The prefill engine is alive, so decode's source watch
(app/handoff/push_source_watch.py) cannot see it.

Prefill knows it will never WRITE for a request whose blocks it has let go (its lease
expired, or its push ended). It now remembers the last such requests and answers a
registration for one of them with a *refusal*: a NIXL notification to decode's agent naming
decode's request. It sends the same when a push's WRITE failed (a NIXL error with both
engines alive): vLLM's prefill then tells decode nothing, and decode waited for good.

Decode turns a refusal into a failed receive, vLLM's own path for a transfer that cannot
complete: a live request recomputes its prompt on decode (``nixl.kv_load_failure_policy:
recompute``), a cancelled one frees its blocks. Nothing can WRITE into those blocks later:
prefill keeps no registration for a refused request, and refuses a failed push only once
every WRITE of it has ended.

The vLLM wiring is app/handoff/push_refusal_patch.py; nothing here imports vLLM or Ray.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

# Not vLLM's PUSH_REG prefix, and not of the "<request id>:<tp>" shape of its completion
# notifications (which would parse "pd-serve-no-kv" as a TP size and fail).
REFUSAL_PREFIX = b"pd-serve-no-kv|"
REMEMBERED = 4096  # let-go requests, and started pushes, a prefill engine keeps


def refusal(decode_request_id: str) -> bytes:
    """The notification prefill sends decode's agent for ``decode_request_id``."""
    return REFUSAL_PREFIX + decode_request_id.encode()


def refused_request(notif: bytes) -> str | None:
    """Decode's request id named by a refusal, or None for any other notification."""
    if not notif.startswith(REFUSAL_PREFIX):
        return None
    return notif[len(REFUSAL_PREFIX):].decode(errors="replace") or None


class Recent:
    """The last ``size`` keys remembered, each with a value; the oldest are forgotten first.

    Prefill keeps two such books: the base ids (vLLM's request id without its random suffix,
    what registrations are matched on) of requests whose blocks it let go, and the
    registrations of pushes it started (for a refusal if their WRITE fails). Bounded: a
    registration later than ``size`` let-go requests is kept as vLLM keeps it (decode's
    source watch and the front's deadline are what is left then).
    """

    def __init__(self, size: int = REMEMBERED):
        self.size = size
        self._items: OrderedDict[str, Any] = OrderedDict()

    def remember(self, key: str, value: Any = None) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def pop(self, key: str, default: Any = None) -> Any:
        return self._items.pop(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

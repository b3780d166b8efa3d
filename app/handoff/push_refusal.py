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

# Not vLLM's PUSH_REG prefix, and not of the "<request id>:<tp>" shape of its completion
# notifications (which would parse "pd-serve-no-kv" as a TP size and fail).
REFUSAL_PREFIX = b"pd-serve-no-kv|"
LET_GO_REMEMBERED = 4096


def refusal(decode_request_id: str) -> bytes:
    """The notification prefill sends decode's agent for ``decode_request_id``."""
    return REFUSAL_PREFIX + decode_request_id.encode()


def refused_request(notif: bytes) -> str | None:
    """Decode's request id named by a refusal, or None for any other notification."""
    if not notif.startswith(REFUSAL_PREFIX):
        return None
    return notif[len(REFUSAL_PREFIX):].decode(errors="replace") or None


class LetGo:
    """The base ids of the last ``size`` requests whose blocks a prefill engine let go.

    Base ids (vLLM's request id without its random suffix) are what registrations are
    matched on. Bounded: a registration later than ``size`` let-go requests is kept as vLLM
    keeps it (decode's source watch and the front's deadline are what is left then).
    """

    def __init__(self, size: int = LET_GO_REMEMBERED):
        self.size = size
        self._ids: OrderedDict[str, None] = OrderedDict()

    def remember(self, base_id: str) -> None:
        self._ids[base_id] = None
        self._ids.move_to_end(base_id)
        while len(self._ids) > self.size:
            self._ids.popitem(last=False)

    def __contains__(self, base_id: object) -> bool:
        return base_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

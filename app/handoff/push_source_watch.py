"""Push: give up on pushed KV whose prefill engine is gone, so decode frees its blocks.

Under push a decode engine allocates a request's blocks and waits for prefill's WRITE.
vLLM's push connector has no receive deadline (its registration watchdog only logs), and it
cannot have a plain one: freeing blocks that a live prefill may still WRITE into would corrupt
whichever request gets them next. vLLM also delays freeing a cancelled request that waits for
remote KV until the receive is reported done. So when the prefill engine died mid-push, the
decode leg's blocks stayed held until the decode replica restarted, and a whole (non-streamed)
request waited without limit.

A WRITE can only come from a live process. This watch asks, for every request awaited longer
than one probe interval, whether its prefill engine's NIXL side channel (the handshake
listener every vLLM NIXL worker keeps open for its life) still accepts connections:

* refused twice in a row: nothing listens there, the engine is gone (dead for sure);
* another engine answers there (a prefill engine restarted on the same host and port before
  two refusals were seen): the awaited one is gone for sure, since its listener would still
  hold the port, so at once. The side channel's handshake names the engine it serves;
* no answer at all (a host down or partitioned) for ``unreachable_s``: treated as gone too;
  a WRITE that outlives that much silence of its source is not expected.

The requests of a gone engine are then reported as failed receives, through vLLM's own path
for them: the scheduler frees the blocks of a request that was cancelled meanwhile, and a live
one recomputes its prompt on decode (``nixl.kv_load_failure_policy: recompute``, the app's
default). Not detected here: a prefill engine that is alive but will not WRITE (a
registration after its lease, or a push whose WRITE failed, is refused by prefill itself:
app/handoff/push_refusal.py). The vLLM wiring, and the handshake query that names the engine
at a side channel, are app/handoff/push_source_watch_patch.py; nothing here imports vLLM or
Ray.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable, Mapping
from enum import Enum

Address = tuple[str, int]  # a NIXL side channel: host, port
Source = tuple[str, int, str]  # an awaited prefill engine: its side channel and engine id

REFUSALS_TO_FAIL = 2
UNREACHABLE_S = 60.0


class Probe(Enum):
    ALIVE = "alive"
    REFUSED = "refused"  # the host answered: nothing listens there
    REPLACED = "replaced"  # another engine listens there: the awaited one is gone
    SILENT = "silent"  # no answer (timeout, no route)


def probe_side_channel(address: Address, timeout_s: float = 0.5) -> Probe:
    """A TCP connect to ``address``; closed at once (the listener sees a peer come and go)."""
    try:
        with socket.create_connection(address, timeout=timeout_s):
            return Probe.ALIVE
    except ConnectionRefusedError:
        return Probe.REFUSED
    except OSError as e:
        return Probe.REFUSED if e.errno == errno.ECONNREFUSED else Probe.SILENT


def probe_engine(source: Source, engine_at: Callable[[Address], str | None],
                 connect: Callable[[Address], Probe] = probe_side_channel) -> Probe:
    """``connect``'s answer for the source's side channel, but REPLACED where a listener
    there names (``engine_at``) an engine other than the awaited one. A listener that does
    not say which engine it is (``None``: no answer in time) counts as the awaited one: only
    a sure sign may fail a receive that a live prefill could still WRITE."""
    host, port, engine_id = source
    probe = connect((host, port))
    if probe is Probe.ALIVE:
        served = engine_at((host, port))
        if served is not None and served != engine_id:
            return Probe.REPLACED
    return probe


class PushSourceWatch:
    """Which awaited pushed requests to give up on, given probes of their sources.

    ``check`` is called every ``interval_s`` with the requests the engine awaits (request id
    → source) and the time; it probes each source of a request awaited for at least one
    interval and returns the requests to fail, each once.
    """

    def __init__(self, interval_s: float, probe: Callable[[Source], Probe],
                 refusals_to_fail: int = REFUSALS_TO_FAIL,
                 unreachable_s: float = UNREACHABLE_S):
        self.interval_s, self.probe = interval_s, probe
        self.refusals_to_fail, self.unreachable_s = refusals_to_fail, unreachable_s
        self._since: dict[str, float] = {}  # request id → first seen awaited
        self._refused: dict[Source, int] = {}  # consecutive refusals
        self._silent_since: dict[Source, float] = {}
        self._failed: set[str] = set()

    def check(self, awaited: Mapping[str, Source], now: float) -> list[str]:
        for req_id in list(self._since):
            if req_id not in awaited:
                del self._since[req_id]
        self._failed &= awaited.keys()
        due: dict[Source, list[str]] = {}
        for req_id, source in awaited.items():
            since = self._since.setdefault(req_id, now)
            if req_id not in self._failed and now - since >= self.interval_s:
                due.setdefault(source, []).append(req_id)
        sources = set(awaited.values())
        for source in list(self._refused.keys() | self._silent_since.keys()):
            if source not in sources:  # nothing awaited from it now: start afresh next time
                self._refused.pop(source, None)
                self._silent_since.pop(source, None)
        out: list[str] = []
        for source, req_ids in due.items():
            if self._gone(source, self.probe(source), now):
                out.extend(req_ids)
        self._failed.update(out)
        return out

    def _gone(self, source: Source, probe: Probe, now: float) -> bool:
        if probe is Probe.REPLACED:
            return True
        if probe is Probe.ALIVE:
            self._refused.pop(source, None)
            self._silent_since.pop(source, None)
            return False
        if probe is Probe.REFUSED:
            self._silent_since.pop(source, None)
            self._refused[source] = self._refused.get(source, 0) + 1
            return self._refused[source] >= self.refusals_to_fail
        self._refused.pop(source, None)
        since = self._silent_since.setdefault(source, now)
        return now - since >= self.unreachable_s

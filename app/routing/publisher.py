"""Replica side of KV-aware routing: tell the router this replica's load, as it changes.

Ray's ``record_routing_stats`` is polled every few seconds; a router placing requests by load
needs milliseconds. Each engine replica therefore publishes a small msgpack report on its own
ZeroMQ PUB socket whenever its load changes (at most every ``min_interval_s``) and as a
heartbeat otherwise; the router subscribes (:mod:`app.routing.feed`) and takes a replica whose
heartbeat stops for dead.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgspec
import zmq


@dataclass
class _Entry:
    prefill_tokens: int


class InFlight:
    """Requests this replica holds and the prompt tokens it has yet to prefill for them."""

    def __init__(self, on_change=None, on_begin=None):
        self._entries: dict[int, _Entry] = {}
        self._next = 0
        self._on_change = on_change or (lambda: None)
        self._on_begin = on_begin or (lambda tokens: None)  # autoscaling: prompt arrivals

    def begin(self, prefill_tokens: int) -> int:
        self._next += 1
        self._entries[self._next] = _Entry(max(prefill_tokens, 0))
        if prefill_tokens > 0:
            self._on_begin(prefill_tokens)
        self._on_change()
        return self._next

    def prefilled(self, key: int) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry.prefill_tokens:
            entry.prefill_tokens = 0
            self._on_change()

    def end(self, key: int) -> None:
        if self._entries.pop(key, None) is not None:
            self._on_change()

    @property
    def running(self) -> int:
        return len(self._entries)

    @property
    def queued_prefill_tokens(self) -> int:
        return sum(e.prefill_tokens for e in self._entries.values())


class LoadPublisher:
    """Binds a PUB socket on a free port; :meth:`run` publishes ``snapshot()`` on changes."""

    def __init__(self, snapshot, advertise_host: str, bind_host: str = "*",
                 min_interval_s: float = 0.002, heartbeat_s: float = 0.5):
        self._snapshot = snapshot
        self._sock = zmq.Context.instance().socket(zmq.PUB)
        self._sock.setsockopt(zmq.SNDHWM, 1000)
        port = self._sock.bind_to_random_port(f"tcp://{bind_host}")
        self.endpoint = f"tcp://{advertise_host}:{port}"
        self._min_interval_s, self._heartbeat_s = min_interval_s, heartbeat_s
        self._changed = asyncio.Event()
        self._encode = msgspec.msgpack.Encoder().encode
        self._task: asyncio.Task | None = None

    def changed(self) -> None:
        self._changed.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), self._heartbeat_s)
            self._changed.clear()
            self.publish()
            await asyncio.sleep(self._min_interval_s)

    def publish(self) -> None:
        snapshot = self._snapshot()
        if snapshot is None:  # the replica cannot serve: silence makes the router drop it
            return
        report: dict[str, Any] = {"ts": time.time(), **snapshot}
        with contextlib.suppress(zmq.Again):
            self._sock.send(self._encode(report), zmq.NOBLOCK)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._sock.close(linger=0)


class Tracked:
    """One request in :class:`InFlight`: ends exactly once, however the response ends."""

    def __init__(self, inflight: InFlight, key: int):
        self._inflight, self._key = inflight, key

    def end(self) -> None:
        self._inflight.end(self._key)

    async def wrap(self, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
        """Pass ``chunks`` through; the first one means prefill is done. Closing the wrapper
        closes ``chunks`` (a client disconnect still aborts the engine request)."""
        try:
            async with contextlib.aclosing(chunks) as inner:
                first = True
                async for chunk in inner:
                    if first:
                        self._inflight.prefilled(self._key)
                        first = False
                    yield chunk
        finally:
            self.end()


class RequestTracker:
    """What a replica tells :class:`InFlight` and the prediction metrics about each request."""

    def __init__(self, inflight: InFlight, phase: str, expect_finish=None, record=None):
        self.inflight, self.phase = inflight, phase
        self._expect_finish = expect_finish  # EngineStatsCollector.expect_finish
        self._record = record  # (phase, predicted, actual) -> None

    def begin(self, request: Any, hint: Any, prefills_here: bool | None = None) -> Tracked:
        """``prefills_here``: this replica computes the prompt (default: the hint says local)."""
        here = hint.local_prefill if prefills_here is None else prefills_here
        to_prefill = hint.prompt_tokens - hint.predicted_cached_tokens if here else 0
        key = self.inflight.begin(to_prefill)
        request_id = getattr(request, "request_id", None)
        if here and hint.plan is not None and request_id and self._expect_finish:
            predicted = hint.predicted_cached_tokens
            self._expect_finish(request_id,
                                lambda actual: self._record(self.phase, predicted, actual))
        return Tracked(self.inflight, key)

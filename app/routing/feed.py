"""The router's inputs from each replica: vLLM KV-cache events and load reports, over ZeroMQ.

One thread owns every socket (ZeroMQ sockets are not thread-safe) and applies what arrives
to the :class:`~app.routing.kv_index.KVIndex` and :class:`~app.routing.load.LoadBook` under a
lock the router's lookups share. Subscriptions follow Ray Serve's replica set: the router
calls :meth:`EventFeed.sync` with the live replicas and their advertised endpoints.

The index must never be silently wrong. A replica's events are read from the start of the
engine's replay buffer when it joins (blocks stored before we subscribed count too); a
sequence gap (dropped messages, a publisher restart) triggers a replay from the first missing
batch, and if the buffer no longer has it, the replica's index is reset: under-estimating a
replica's cache costs a cache miss, over-estimating it costs a wrong route.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any

import msgspec
import zmq
import zmq.utils.monitor

from app.routing.kv_index import (
    AllBlocksCleared,
    ApplyStatus,
    BlocksRemoved,
    BlocksStored,
    KVEvent,
    KVIndex,
)
from app.routing.load import LoadBook

log = logging.getLogger("ray.serve")

_REPLAY_TIMEOUT_MS = 1000
_END_SEQ = (-1).to_bytes(8, "big", signed=True)


@dataclass(frozen=True)
class Endpoints:
    """What a replica advertises (``record_replica_metadata``)."""

    kv_events: str | None
    kv_replay: str | None
    load: str | None


def convert_events(raw_events: list[Any]) -> list[KVEvent]:
    """vLLM's event structs -> the index's (unknown kinds are ignored, not guessed at)."""
    out: list[KVEvent] = []
    for e in raw_events:
        kind = type(e).__name__
        if kind == "BlockStored":
            out.append(BlocksStored(tuple(e.block_hashes), e.parent_block_hash))
        elif kind == "BlockRemoved":
            out.append(BlocksRemoved(tuple(e.block_hashes)))
        elif kind == "AllBlocksCleared":
            out.append(AllBlocksCleared())
    return out


class EventFeed:
    def __init__(self, index: KVIndex, loads: LoadBook, lock: threading.Lock):
        from vllm.distributed.kv_events import KVEventBatch

        self.index, self.loads, self.lock = index, loads, lock
        self._decode_batch = msgspec.msgpack.Decoder(type=KVEventBatch).decode
        self._decode_load = msgspec.msgpack.Decoder().decode
        self._commands: queue.Queue = queue.Queue()
        self._wanted: dict[str, Endpoints] = {}
        self.counters = {"batches": 0, "gaps": 0, "replays": 0, "resets": 0, "reports": 0,
                         "disconnects": 0}
        self._running = True
        self._thread = threading.Thread(target=self._run, name="kv-event-feed", daemon=True)
        self._thread.start()

    def sync(self, replicas: dict[str, Endpoints]) -> None:
        """Subscribe to new replicas, drop departed ones (called on every replica-set change)."""
        if replicas != self._wanted:
            self._wanted = dict(replicas)
            self._commands.put(dict(replicas))

    def close(self) -> None:
        self._running = False
        self._thread.join(timeout=2)

    # --- the feed thread ---------------------------------------------------------------------

    def _run(self) -> None:
        ctx = zmq.Context.instance()
        poller = zmq.Poller()
        subs: dict[str, list[zmq.Socket]] = {}
        owner: dict[zmq.Socket, tuple[str, str]] = {}  # socket -> (replica, "kv" | "load")
        endpoints: dict[str, Endpoints] = {}
        while self._running:
            try:  # with no socket to poll, wait here instead (zmq's poll would not wait)
                wanted = self._commands.get(timeout=0.1) if not owner else \
                    self._commands.get_nowait()
            except queue.Empty:
                wanted = None
            if wanted is not None:
                self._resubscribe(ctx, poller, subs, owner, endpoints, wanted)
            for sock, _ in (poller.poll(100) if owner else ()):
                replica, kind = owner[sock]
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                    if kind == "kv":
                        self._on_kv(ctx, replica, endpoints[replica], frames)
                    elif kind == "monitor":
                        if zmq.utils.monitor.parse_monitor_message(frames)["event"] == \
                                zmq.EVENT_DISCONNECTED:
                            with self.lock:
                                self.loads.mark_down(replica)
                            self.counters["disconnects"] += 1
                    else:
                        report = self._decode_load(frames[-1])
                        with self.lock:
                            self.loads.report(replica, report)
                        self.counters["reports"] += 1
                except zmq.Again:
                    continue
                except Exception as exc:  # noqa: BLE001 - one bad message must not stop routing
                    log.warning("kv feed: bad message from %s (%s): %s", replica, kind, exc)
        for socks in subs.values():
            for s in socks:
                s.close(linger=0)

    def _resubscribe(self, ctx, poller, subs, owner, endpoints, wanted) -> None:
        for replica in [r for r in subs if r not in wanted or wanted[r] != endpoints.get(r)]:
            for s in subs.pop(replica):
                poller.unregister(s)
                owner.pop(s, None)
                s.close(linger=0)
            endpoints.pop(replica, None)
            with self.lock:
                self.index.remove_replica(replica)
                self.loads.remove(replica)
        for replica, ep in wanted.items():
            if replica in subs:
                continue
            endpoints[replica] = ep
            with self.lock:
                self.index.add_replica(replica)
                self.loads.add(replica)
            socks = []
            for kind, url in (("kv", ep.kv_events), ("load", ep.load)):
                if not url:
                    continue
                s = ctx.socket(zmq.SUB)
                s.setsockopt(zmq.SUBSCRIBE, b"")
                s.setsockopt(zmq.RCVHWM, 100_000)
                s.connect(url)
                poller.register(s, zmq.POLLIN)
                owner[s] = (replica, kind)
                socks.append(s)
                if kind == "load":
                    # A replica's process dying closes this TCP connection at once: take it out
                    # of routing now, not when its heartbeat goes stale.
                    monitor = s.get_monitor_socket(zmq.EVENT_DISCONNECTED)
                    poller.register(monitor, zmq.POLLIN)
                    owner[monitor] = (replica, "monitor")
                    socks.append(monitor)
            subs[replica] = socks
            if ep.kv_events:
                self._replay(ctx, replica, ep, 0)  # blocks stored before we subscribed

    def _on_kv(self, ctx, replica: str, ep: Endpoints, frames: list[bytes]) -> None:
        seq, batch = self._parse(frames)
        events = convert_events(batch.events)
        with self.lock:
            result = self.index.apply_batch(replica, seq, events)
        self.counters["batches"] += 1
        if result.status is ApplyStatus.GAP:
            self.counters["gaps"] += 1
            log.warning("kv feed: %s skipped batches %s..%s; replaying", replica,
                        result.expected_seq, seq - 1)
            self._replay(ctx, replica, ep, result.expected_seq or 0)
            with self.lock:
                result = self.index.apply_batch(replica, seq, events)
            if result.status is ApplyStatus.GAP:  # the buffer no longer had them: start over
                self.counters["resets"] += 1
                with self.lock:
                    self.index.reset_replica(replica)
                    self.index.apply_batch(replica, seq, events)

    def _parse(self, frames: list[bytes]) -> tuple[int, Any]:
        _topic, seq_bytes, payload = frames[-3:]
        return int.from_bytes(seq_bytes, "big", signed=True), self._decode_batch(payload)

    def _replay(self, ctx, replica: str, ep: Endpoints, start_seq: int) -> bool:
        """Ask the engine's replay socket for batches from ``start_seq`` and apply them."""
        if not ep.kv_replay:
            return False
        self.counters["replays"] += 1
        sock = ctx.socket(zmq.DEALER)
        try:
            sock.connect(ep.kv_replay)
            sock.send_multipart((b"", start_seq.to_bytes(8, "big")))
            while sock.poll(_REPLAY_TIMEOUT_MS):
                frames = sock.recv_multipart()
                if len(frames) >= 3 and frames[-2] == _END_SEQ:
                    return True
                seq, batch = self._parse(frames)
                with self.lock:
                    self.index.apply_batch(replica, seq, convert_events(batch.events))
            log.warning("kv feed: replay from %s timed out", replica)
            return False
        finally:
            sock.close(linger=0)

"""A direct request plane from the decode front to the prefill replicas (``handoff.prefill_plane``).

The prefill leg is one small call per request, and through a Ray Serve handle it pays Ray's
request router, a thread hop into the handle's router loop, the replica's request machinery
and a thread hop into user code, on each side (~2 ms each way measured, docs/HANDOFF.md). This
plane is one persistent TCP connection per (front, prefill replica), served on the prefill
replica's own engine event loop, carrying length-prefixed pickled calls multiplexed by id.

It keeps what the handle gave: a cancelled call (timeout, client gone) is cancelled on the
replica, so the engine aborts the request and frees its blocks; a connection that drops
cancels every call on it, on both ends. The caller treats any failure like a prefill replica
failure (the orchestrator prefills locally), so nothing accepted is lost.

Trust: the server unpickles only after the client proved it knows the replica's random token,
which only members of the Ray cluster can read (the replica's metadata, through Ray's
controller) and who could run code on it anyway.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import pickle
import random
import secrets
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from app.handoff.push import PushTarget

log = logging.getLogger("ray.serve")

_LEN = struct.Struct("!I")
TOKEN_BYTES = 32
MAX_FRAME = 256 * 1024 * 1024  # a 1M-token prompt pickles to ~5 MB; anything bigger is junk
CALL, CANCEL, OK, FAILED = "call", "cancel", "ok", "failed"

Handler = Callable[..., Awaitable[Any]]  # (kind, request, **routing) -> Head


class PlaneError(ConnectionError):
    """The plane could not carry the call (connection lost, remote exception)."""


class PlaneUnreachable(PlaneError):
    """No connection could be made: the call was never sent, so it may go another way."""


async def _read_frame(reader: asyncio.StreamReader) -> Any:
    (size,) = _LEN.unpack(await reader.readexactly(_LEN.size))
    if size > MAX_FRAME:
        raise PlaneError(f"frame of {size} bytes exceeds {MAX_FRAME}")
    return pickle.loads(await reader.readexactly(size))


def _frame(message: Any) -> bytes:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(payload)) + payload


# --- the prefill replica's side -------------------------------------------------------------


class PlaneServer:
    """Serves ``handler``; runs on the loop that owns the engine. Listens on ``bind_host``
    (``"*"``: every interface) and tells fronts to connect to ``host``."""

    def __init__(self, handler: Handler, host: str, bind_host: str | None = None):
        self.handler = handler
        self.host = host
        self.bind_host = None if bind_host == "*" else (bind_host or host)
        self.token = secrets.token_bytes(TOKEN_BYTES)
        self.port = 0
        self.calls = 0  # served since start (stats)
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.bind_host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def endpoint(self) -> dict[str, str]:
        """What a front needs to reach this server: the replica metadata's ``prefill_plane``."""
        return {"address": f"{self.host}:{self.port}", "token": self.token.hex()}

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(asyncio.current_task())
        calls: dict[int, asyncio.Task] = {}
        try:
            token = await asyncio.wait_for(reader.readexactly(TOKEN_BYTES), 10.0)
            if not hmac.compare_digest(token, self.token):
                log.warning("prefill plane: refused a connection with a wrong token")
                return
            while True:
                message = await _read_frame(reader)
                if message[0] == CALL:
                    _, call_id, kind, request, routing = message
                    self.calls += 1
                    calls[call_id] = asyncio.ensure_future(
                        self._run(writer, calls, call_id, kind, request, routing))
                elif message[0] == CANCEL and message[1] in calls:
                    calls[message[1]].cancel()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass  # the front went away: its calls are cancelled below
        except Exception as exc:  # noqa: BLE001 - a bad frame ends this connection only
            log.warning("prefill plane: dropping a connection: %s: %s", type(exc).__name__, exc)
        finally:
            for task in calls.values():
                task.cancel()
            writer.close()
            self._connections.discard(asyncio.current_task())

    async def _run(self, writer: asyncio.StreamWriter, calls: dict[int, asyncio.Task],
                   call_id: int, kind: str, request: Any, routing: dict[str, Any]) -> None:
        try:
            frame = _frame((OK, call_id, await self.handler(kind, request, **routing)))
        except asyncio.CancelledError:
            return
        except Exception as exc:  # noqa: BLE001 - the front falls back on any failure
            frame = _frame((FAILED, call_id, f"{type(exc).__name__}: {exc}"[:2000]))
        finally:
            calls.pop(call_id, None)
        if not writer.is_closing():
            writer.write(frame)

    def close(self) -> None:
        """Stop listening and drop every connection (their calls are cancelled)."""
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()


# --- the front's side -----------------------------------------------------------------------


class PlaneConnection:
    """One persistent connection to one prefill replica, calls multiplexed by id."""

    def __init__(self, address: str, token: str):
        self.address = address
        self._token = bytes.fromhex(token)
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count()
        self._connecting = asyncio.Lock()  # binds no loop until first used (3.10+)
        self.closed = False

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    async def _connect(self) -> asyncio.StreamWriter:
        async with self._connecting:
            if self._writer is None:
                host, port = self.address.rsplit(":", 1)
                reader, writer = await asyncio.open_connection(host, int(port))
                writer.write(self._token)
                self._writer = writer
                self._reader_task = asyncio.ensure_future(self._read(reader))
        return self._writer

    async def _read(self, reader: asyncio.StreamReader) -> None:
        why: BaseException = PlaneError(f"prefill plane connection to {self.address} closed")
        try:
            while True:
                status, call_id, value = await _read_frame(reader)
                future = self._pending.pop(call_id, None)
                if future is None or future.done():
                    continue
                if status == OK:
                    future.set_result(value)
                else:
                    future.set_exception(PlaneError(f"prefill replica failed: {value}"))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every pending call fails with it
            why = exc if isinstance(exc, PlaneError) else PlaneError(
                f"prefill plane connection to {self.address} lost: {type(exc).__name__}")
        finally:
            self.close(why)

    async def call(self, kind: str, request: Any, routing: dict[str, Any]) -> Any:
        if self.closed:
            raise PlaneError(f"prefill plane connection to {self.address} is closed")
        try:
            writer = await self._connect()
        except OSError as exc:
            why = PlaneUnreachable(f"cannot connect to prefill plane {self.address}: {exc}")
            self.close(why)
            raise why from exc
        call_id = next(self._ids)
        frame = _frame((CALL, call_id, kind, request, routing))  # unpicklable: raises here
        future = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        writer.write(frame)
        try:
            return await future
        except asyncio.CancelledError:
            if self._pending.pop(call_id, None) is not None and not writer.is_closing():
                writer.write(_frame((CANCEL, call_id)))  # the replica aborts the request
            raise

    def close(self, why: BaseException | None = None) -> None:
        self.closed = True
        for future in self._pending.values():
            if not future.done():
                future.set_exception(why or PlaneError(f"{self.address} closed"))
        self._pending.clear()
        if self._writer is not None:
            self._writer.close()
        task, self._reader_task = self._reader_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()


@dataclass
class PlanePool:
    """The front's connections, one per live prefill replica, and its choice among them.

    ``update`` takes the replica set Ray's long-poll keeps (full replica id -> metadata); a
    replica without a ``prefill_plane`` endpoint is not reachable here (the caller uses the
    handle). The choice honours the KV router's pick; otherwise power of two choices on this
    front's own calls in flight (one front sees its own load exactly; with several fronts,
    each balances its share)."""

    rng: random.Random = field(default_factory=random.Random)
    _endpoints: dict[str, dict[str, Any]] = field(default_factory=dict)
    _connections: dict[str, PlaneConnection] = field(default_factory=dict)

    def update(self, replicas: dict[str, dict[str, Any]]) -> None:
        self._endpoints = {rid: meta["prefill_plane"] for rid, meta in replicas.items()
                           if isinstance(meta.get("prefill_plane"), dict)}
        for rid in list(self._connections):
            if rid not in self._endpoints:
                self._connections.pop(rid).close()

    def __len__(self) -> int:
        return len(self._endpoints)

    def choose(self, hint: str | None = None) -> str | None:
        if not self._endpoints:
            return None
        if hint in self._endpoints:
            return hint
        ids = list(self._endpoints)
        if len(ids) == 1:
            return ids[0]
        a, b = self.rng.sample(ids, 2)
        return a if self._load(a) <= self._load(b) else b

    def push_target(self, hint: str | None = None) -> PushTarget | None:
        """The replica a pushed request goes to (chosen as ``choose`` does) with its NIXL
        coordinates; None if none is known or the chosen one does not take pushes."""
        rid = self.choose(hint)
        return PushTarget.from_endpoint(rid, self._endpoints[rid]) if rid is not None else None

    def _load(self, rid: str) -> int:
        conn = self._connections.get(rid)
        return conn.in_flight if conn is not None else 0

    def connection(self, rid: str) -> PlaneConnection:
        conn = self._connections.get(rid)
        if conn is None or conn.closed:
            endpoint = self._endpoints[rid]
            conn = self._connections[rid] = PlaneConnection(endpoint["address"],
                                                            endpoint["token"])
        return conn

    def close(self) -> None:
        for conn in self._connections.values():
            conn.close()
        self._connections.clear()


class PlanePrefillClient:
    """An :class:`app.orchestrator.EngineClient` whose ``call_once`` (the prefill leg) takes
    the plane when the replica set is known, and the handle client otherwise (before Ray's
    long-poll first delivered it, or if no replica serves a plane)."""

    def __init__(self, handle_client: Any, pool: PlanePool | None = None):
        self._handle = handle_client
        self.pool = pool or PlanePool()

    async def call_once(self, kind: str, request: Any, **routing: Any) -> Any:
        rid = self.pool.choose(routing.get("prefill_replica"))
        if rid is not None:
            try:
                return await self.pool.connection(rid).call(kind, request, routing)
            except PlaneUnreachable as exc:  # e.g. the replica just died: Ray knows better
                log.warning("%s; calling prefill through its handle", exc)
        return await self._handle.call_once(kind, request, **routing)

    def push_target(self, hint: str | None = None) -> PushTarget | None:
        return self.pool.push_target(hint)

    def stream(self, kind: str, request: Any, **routing: Any):
        return self._handle.stream(kind, request, **routing)

    async def models(self) -> dict[str, Any]:
        return await self._handle.models()

    async def check_health(self) -> None:
        await self._handle.check_health()

    def close(self) -> None:
        self.pool.close()

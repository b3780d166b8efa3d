"""The prefill plane (app/handoff/prefill_plane.py): real sockets on 127.0.0.1, fake handlers."""

from __future__ import annotations

import asyncio
import random
import threading

import pytest

from app.engine_protocol import KIND_JSON, Head
from app.handoff.prefill_plane import (
    PlaneConnection,
    PlaneError,
    PlanePool,
    PlanePrefillClient,
    PlaneServer,
    PlaneUnreachable,
)

HOST = "127.0.0.1"


class Handler:
    """Answers after ``release`` is set (when given); records calls and cancellations."""

    def __init__(self, release: asyncio.Event | None = None, fail: bool = False):
        self.release = release
        self.fail = fail
        self.calls: list[tuple[str, object, dict]] = []
        self.cancelled = 0
        self.started = asyncio.Event()

    async def __call__(self, kind, request, **routing):
        self.calls.append((kind, request, routing))
        self.started.set()
        try:
            if self.release is not None:
                await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.fail:
            raise RuntimeError("engine exploded")
        return Head(KIND_JSON, 200, {"echo": request, "routing": routing})


async def _server(handler) -> PlaneServer:
    server = PlaneServer(handler, HOST)
    await server.start()
    return server


async def _wait_for(predicate, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_call_returns_the_handlers_head_with_routing_keywords():
    handler = Handler()
    server = await _server(handler)
    conn = PlaneConnection(**server.endpoint())
    try:
        head = await conn.call("completion", {"prompt": [1, 2, 3]}, {"prefill_replica": "r1"})
        assert head == Head(KIND_JSON, 200, {"echo": {"prompt": [1, 2, 3]},
                                             "routing": {"prefill_replica": "r1"}})
        assert handler.calls == [("completion", {"prompt": [1, 2, 3]},
                                  {"prefill_replica": "r1"})]
        assert conn.in_flight == 0
    finally:
        conn.close()
        server.close()


async def test_calls_share_one_connection_and_complete_out_of_order():
    gates = {i: asyncio.Event() for i in range(3)}

    async def handler(kind, request, **routing):
        await gates[request].wait()
        return Head(KIND_JSON, 200, {"n": request})

    server = await _server(handler)
    conn = PlaneConnection(**server.endpoint())
    try:
        tasks = [asyncio.ensure_future(conn.call("chat", i, {})) for i in range(3)]
        await _wait_for(lambda: conn.in_flight == 3)
        for i in (2, 0, 1):
            gates[i].set()
            assert (await tasks[i]).body == {"n": i}
        assert len(server._connections) == 1
    finally:
        conn.close()
        server.close()


async def test_a_wrong_token_is_refused_before_anything_is_unpickled():
    handler = Handler()
    server = await _server(handler)
    endpoint = server.endpoint()
    conn = PlaneConnection(endpoint["address"], "00" * 32)
    try:
        with pytest.raises(PlaneError):
            await asyncio.wait_for(conn.call("completion", {"x": 1}, {}), 5)
        assert handler.calls == []
    finally:
        conn.close()
        server.close()


async def test_cancelling_the_caller_cancels_the_call_on_the_server():
    release = asyncio.Event()
    handler = Handler(release)
    server = await _server(handler)
    conn = PlaneConnection(**server.endpoint())
    try:
        task = asyncio.ensure_future(conn.call("completion", {}, {}))
        await asyncio.wait_for(handler.started.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await _wait_for(lambda: handler.cancelled == 1)
        assert conn.in_flight == 0
        # the connection stays usable for the next call
        release.set()
        assert (await conn.call("completion", {"again": True}, {})).status == 200
    finally:
        conn.close()
        server.close()


async def test_a_front_that_goes_away_cancels_its_calls_on_the_server():
    handler = Handler(asyncio.Event())
    server = await _server(handler)
    conn = PlaneConnection(**server.endpoint())
    try:
        task = asyncio.ensure_future(conn.call("completion", {}, {}))
        await asyncio.wait_for(handler.started.wait(), 5)
        conn.close()
        with pytest.raises(PlaneError):
            await task
        await _wait_for(lambda: handler.cancelled == 1)
    finally:
        server.close()


async def test_a_replica_that_goes_away_fails_pending_calls_instead_of_hanging():
    handler = Handler(asyncio.Event())
    server = await _server(handler)
    conn = PlaneConnection(**server.endpoint())
    task = asyncio.ensure_future(conn.call("completion", {}, {}))
    await asyncio.wait_for(handler.started.wait(), 5)
    server.close()
    with pytest.raises(PlaneError):
        await asyncio.wait_for(task, 5)
    assert conn.closed


async def test_a_failing_handler_reaches_the_caller_as_a_plane_error():
    server = await _server(Handler(fail=True))
    conn = PlaneConnection(**server.endpoint())
    try:
        with pytest.raises(PlaneError, match="engine exploded"):
            await conn.call("completion", {}, {})
    finally:
        conn.close()
        server.close()


async def test_nothing_listening_is_unreachable():
    server = await _server(Handler())
    endpoint = server.endpoint()
    server.close()
    await asyncio.sleep(0)
    with pytest.raises(PlaneUnreachable):
        await PlaneConnection(**endpoint).call("completion", {}, {})


def test_pool_honours_the_routers_pick_and_balances_otherwise():
    pool = PlanePool(rng=random.Random(0))
    assert pool.choose() is None
    pool.update({"a": {"prefill_plane": {"address": "h:1", "token": "00"}},
                 "b": {"prefill_plane": {"address": "h:2", "token": "00"}},
                 "c": {"kv_events": "tcp://h:3"}})  # no plane: not reachable here
    assert len(pool) == 2
    assert pool.choose("b") == "b"
    assert pool.choose("c") in {"a", "b"}
    pool.connection("a")._pending.update({1: None, 2: None})  # two calls in flight on a
    assert {pool.choose() for _ in range(20)} == {"b"}
    pool.connection("a")._pending.clear()
    pool.update({"b": {"prefill_plane": {"address": "h:2", "token": "00"}}})
    assert pool.choose("a") == "b"
    assert "a" not in pool._connections


class FakeHandleClient:
    def __init__(self):
        self.calls = []

    async def call_once(self, kind, request, **routing):
        self.calls.append((kind, request, routing))
        return Head(KIND_JSON, 200, {"via": "handle"})


async def test_client_uses_the_handle_until_replicas_are_known_and_when_unreachable():
    handle = FakeHandleClient()
    client = PlanePrefillClient(handle)
    assert (await client.call_once("completion", {}, prefill_replica="r")).body == {
        "via": "handle"}

    server = await _server(Handler())
    client.pool.update({"r": {"prefill_plane": server.endpoint()}})
    try:
        head = await client.call_once("completion", {"p": 1}, prefill_replica="r")
        assert head.body["routing"] == {"prefill_replica": "r"}
        assert len(handle.calls) == 1
        server.close()
        client.pool.close()
        await asyncio.sleep(0)
        head = await client.call_once("completion", {"p": 2})
        assert head.body == {"via": "handle"}  # connection refused: never sent, so resent
        assert len(handle.calls) == 2
    finally:
        client.close()
        server.close()


async def test_an_answer_that_cannot_be_sent_fails_the_call_instead_of_hanging():
    async def handler(kind, request, **routing):
        return Head(KIND_JSON, 200, {"lock": threading.Lock()})  # unpicklable

    server = await _server(handler)
    conn = PlaneConnection(**server.endpoint())
    try:
        with pytest.raises(PlaneError, match="pickle"):
            await asyncio.wait_for(conn.call("completion", {}, {}), 5)
        with pytest.raises(TypeError):  # a request that cannot be sent is not left pending
            await conn.call("completion", {"lock": threading.Lock()}, {})
        assert conn.in_flight == 0
    finally:
        conn.close()
        server.close()

"""The two ways the front reaches an engine: a Ray Serve handle, or the engine in this process.

Both satisfy :class:`app.orchestrator.EngineClient`. The in-process client is what makes the
engine-hosting front cheap: no Ray hop between the HTTP server and the engine, so the first
token and every later one go straight from vLLM to the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from app.config import AppConfig, HandleTransport
from app.engine_host import EngineHost
from app.engine_protocol import Head
from app.handoff.prefill_plane import PlanePrefillClient
from app.migration import EngineLost
from app.stream_ledger import StreamLedger

log = logging.getLogger("ray.serve")


def too_large_for_grpc(exc: BaseException) -> bool:
    """Whether a by-value (gRPC) handle call failed because the request exceeded the
    replica's gRPC message limit (``RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH``, 4 MiB by
    default): the replica never saw it, so it can be sent again as an actor call."""
    return (isinstance(exc, grpc.RpcError) and callable(getattr(exc, "code", None))
            and exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED)


class HandleEngineClient:
    """An engine in another replica, reached through a Ray Serve deployment handle.

    ``transport="grpc"`` sends calls by value over the replica's own inter-deployment gRPC
    server (``handle.options(_by_reference=False)``): the same request router, replica
    choice and cancellation, without Ray's task submission and object store. Measured on
    this 2-core box: a handle round trip 1.6 vs 2.6 ms, the prefill leg's hop into the
    replica 2.0-2.3 vs 3.4 ms (docs/BENCHMARKS.md). A request over the gRPC message limit
    is sent again as an actor call.
    """

    def __init__(self, handle: Any, transport: HandleTransport = "grpc"):
        self._actor = handle
        self._by_value = transport == "grpc"
        self._first = handle.options(_by_reference=False) if self._by_value else handle
        self._actor_stream = handle.options(stream=True)
        self._first_stream = self._first.options(stream=True)

    def _resend(self, exc: BaseException) -> bool:
        """Whether a by-value call that failed with ``exc`` goes again as an actor call."""
        return self._by_value and too_large_for_grpc(exc)

    async def call_once(self, kind: str, request: Any, **routing: Any) -> Head:
        """``routing``: the router's choice (``prefill_replica``...), read by the deployment's
        request router (app.routing.pool_routers) and passed on to ``generate_once``."""
        try:
            return await self._call_once(self._first, kind, request, routing)
        except Exception as exc:
            if not self._resend(exc):
                raise
        return await self._call_once(self._actor, kind, request, routing)

    @staticmethod
    async def _call_once(handle: Any, kind: str, request: Any, routing: dict[str, Any]
                         ) -> Head:
        response = handle.generate_once.remote(kind, request, **routing)
        try:
            return await response
        except asyncio.CancelledError:
            response.cancel()  # timeout or client gone: the engine aborts the request
            raise

    async def stream(self, kind: str, request: Any, **routing: Any
                     ) -> AsyncIterator[Head | str]:
        """``routing``: e.g. ``exclude_replica`` (``DecodePoolRouter``), for migrations."""
        generator = self._first_stream.generate.remote(kind, request, **routing)
        finished = False
        try:
            try:
                first = await anext(generator)
            except Exception as exc:
                if not self._resend(exc):
                    raise
                generator = self._actor_stream.generate.remote(kind, request, **routing)
                first = await anext(generator)
            yield first
            async for item in generator:
                yield item
            finished = True
        except StopAsyncIteration:
            finished = True
        finally:
            if not finished:
                generator.cancel()  # client disconnected: free the request's KV blocks

    async def models(self) -> dict[str, Any]:
        return await self._actor.models.remote()

    async def check_health(self) -> None:
        await self._actor.check_health.remote()


def prefill_client(handle: Any, cfg: AppConfig) -> Any:
    """The front's way to the prefill deployment: its handle, or the prefill plane
    (``handoff.prefill_plane``) over the replica set Ray's long-poll keeps for that handle
    (published by ``PrefillPoolRouter`` into this process's registry)."""
    client = HandleEngineClient(handle, cfg.handoff.handle_transport)  # initializes the handle
    if not cfg.uses_prefill_plane:
        return client
    from app.routing import replica_registry

    plane = PlanePrefillClient(client)
    loop = asyncio.get_running_loop()
    name = handle.deployment_name

    def changed(deployment: str, replicas: dict[str, dict[str, Any]]) -> None:
        if deployment == name:  # called on Ray's router loop: update on ours
            with contextlib.suppress(RuntimeError):  # our loop closed: shutting down
                loop.call_soon_threadsafe(plane.pool.update, replicas)

    replica_registry.on_change(changed)
    return plane


class RemoteDecodeClient:
    """The decode engine of another replica, for a front deployed on its own
    (``front.mode: separate``).

    A replica that dies under a request (its process killed, its node lost, or only its
    engine) ends the request's stream in :class:`EngineLost` holding what the client already
    has (:class:`app.stream_ledger.StreamLedger`), so the front's migrator continues it on
    another replica, as the engine-hosting front does when its own engine dies.
    """

    def __init__(self, client: HandleEngineClient):
        """``client``: the decode deployment's handle client (its raw streams also serve
        the migrator's peers)."""
        self._client = client

    async def call_once(self, kind: str, request: Any, **routing: Any) -> Head:
        return await self._client.call_once(kind, request, **routing)

    async def stream(self, kind: str, request: Any) -> AsyncIterator[Head | str]:
        ledger = None
        if getattr(request, "stream", False):
            asked = bool(getattr(request, "return_token_ids", False))
            ledger = StreamLedger(kind, hide_ids=not asked)
            if not asked:
                request = request.model_copy(update={"return_token_ids": True})
        inner = self._client.stream(kind, request)
        try:
            try:
                head = await anext(inner)
            except StopAsyncIteration:
                raise EngineLost() from None
            except Exception as exc:  # noqa: BLE001 - replica gone before it answered
                _log_lost(exc, "before answering")
                raise EngineLost() from exc
            yield head
            while True:
                try:
                    chunk = await anext(inner)
                except StopAsyncIteration:
                    return
                except Exception as exc:  # noqa: BLE001 - replica or its engine gone
                    _log_lost(exc, "mid-stream")
                    raise (ledger.lost() if ledger is not None else EngineLost()) from exc
                out = ledger.relay(chunk) if ledger is not None else chunk
                if out is not None:
                    yield out
        finally:
            await inner.aclose()

    async def models(self) -> dict[str, Any]:
        return await self._client.models()

    async def check_health(self) -> None:
        await self._client.check_health()


def _log_lost(exc: BaseException, when: str) -> None:
    if not isinstance(exc, EngineLost):
        log.warning("decode replica lost %s (%s: %s); continuing on another replica", when,
                    type(exc).__name__, str(exc)[:200])


class LocalEngineClient:
    """The engine hosted by this very replica.

    Cancellation needs no extra code: a client disconnect cancels the task awaiting the next
    chunk, the CancelledError unwinds into vLLM's ``AsyncLLM.generate``, and vLLM aborts the
    request, exactly as under ``vllm serve``.
    """

    def __init__(self, host: EngineHost):
        self._host = host

    async def call_once(self, kind: str, request: Any, **routing: Any) -> Head:
        return await self._host.generate_once(kind, request)

    def stream(self, kind: str, request: Any) -> AsyncIterator[Head | str]:
        return self._host.generate(kind, request)

    async def models(self) -> dict[str, Any]:
        return await self._host.models()

    async def check_health(self) -> None:
        await self._host.check_health()

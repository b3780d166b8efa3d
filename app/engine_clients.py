"""The two ways the front reaches an engine: a Ray Serve handle, or the engine in this process.

Both satisfy :class:`app.orchestrator.EngineClient`. The in-process client is what makes the
engine-hosting front cheap: no Ray hop between the HTTP server and the engine, so the first
token and every later one go straight from vLLM to the socket.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from app.engine_host import EngineHost
from app.engine_protocol import Head


class HandleEngineClient:
    """An engine in another replica, reached through a Ray Serve deployment handle."""

    def __init__(self, handle: Any):
        self._handle = handle
        self._stream_handle = handle.options(stream=True)

    async def call_once(self, kind: str, request: Any, **routing: Any) -> Head:
        """``routing``: the router's choice (``prefill_replica``...), read by the deployment's
        request router (app.routing.pool_routers) and passed on to ``generate_once``."""
        response = self._handle.generate_once.remote(kind, request, **routing)
        try:
            return await response
        except asyncio.CancelledError:
            response.cancel()  # timeout or client gone: the engine aborts the request
            raise

    async def stream(self, kind: str, request: Any, **routing: Any
                     ) -> AsyncIterator[Head | str]:
        """``routing``: e.g. ``exclude_replica`` (``DecodePoolRouter``), for migrations."""
        generator = self._stream_handle.generate.remote(kind, request, **routing)
        finished = False
        try:
            async for item in generator:
                yield item
            finished = True
        finally:
            if not finished:
                generator.cancel()  # client disconnected: free the request's KV blocks

    async def models(self) -> dict[str, Any]:
        return await self._handle.models.remote()

    async def check_health(self) -> None:
        await self._handle.check_health.remote()


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

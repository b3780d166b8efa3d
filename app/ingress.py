"""The OpenAI-compatible HTTP front: a Starlette app under ``@serve.ingress``.

Requests are parsed and validated with vLLM's own protocol models, so what vLLM rejects we
reject the same way, before any engine is touched. The P/D flow itself lives in
:mod:`app.orchestrator`; this module maps HTTP to it. The front is mixed into the engine
deployments that serve HTTP (``app.deployments.EngineFront``), not deployed on its own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from app.api_keys import APIKeys
from app.config import AppConfig
from app.metrics.math import NO_ROUTE
from app.metrics.observer import NULL_OBSERVER
from app.migration import Migrator, PeerStream
from app.openai_errors import error_response, validation_message
from app.orchestrator import DecodeProbe, EngineClient, FirstTokenPath, PDOrchestrator
from app.request_limits import RequestRejected, parse_json_object, read_limited
from app.routing.hints import RouteHint, read_route_hint
from app.routing.publisher import RequestTracker

log = logging.getLogger("ray.serve")

ROUTE_HEADER = "x-pd-route"
HEALTH_TIMEOUT_S = 10.0


class OpenAIFront:
    """HTTP routes over a :class:`PDOrchestrator`; mixed into every class that serves HTTP.

    Subclasses call :meth:`_init_front` from their constructor, then ``@serve.ingress()``
    builds the Starlette app from :meth:`__serve_build_asgi_app__`.
    """

    def _init_front(self, cfg: AppConfig, decode: EngineClient,
                    prefill: EngineClient | None = None,
                    tracker: RequestTracker | None = None,
                    peer: PeerStream | None = None, block_size: int = 0,
                    max_model_len: int = 0,
                    decode_probe: DecodeProbe | None = None) -> None:
        """``tracker``: told when requests start, finish prefill and end (the KV router's
        load reports); router headers are honoured only when one is given. ``peer``: runs a
        request on another replica, for migrations when this one's engine dies.
        ``block_size``, ``max_model_len``: the decode engine's (the first-token fast path);
        ``decode_probe``: what the decode engine saw of a request (``handoff.timeline``)."""
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest

        self.cfg = cfg
        self._request_models = {"completion": CompletionRequest, "chat": ChatCompletionRequest}
        self._metrics = None
        if cfg.metrics.enabled:
            from app.metrics.ray_metrics import FrontMetrics

            self._metrics = FrontMetrics("aggregated" if cfg.mode == "aggregated" else "decode")
        observer = self._metrics or NULL_OBSERVER
        served = cfg.model.served_model_name
        first_token = None
        if cfg.handoff.first_token_from_prefill and prefill is not None:
            first_token = FirstTokenPath(self._to_request, served, block_size, max_model_len)
        self.orchestrator = PDOrchestrator(
            mode=cfg.mode,
            decode=decode,
            prefill=prefill,
            prefill_timeout_s=cfg.routing.prefill_timeout_s,
            migrator=Migrator(peer, self._to_request, served,
                              cfg.server.max_migrations, observer=observer)
            if peer is not None else None,
            observer=observer,
            first_token=first_token,
            timeline=decode_probe if cfg.handoff.timeline else None,
            push_target=getattr(prefill, "push_target", None) if cfg.push_transfer else None,
            push_wait_s=cfg.handoff.push_wait_s,
        )
        self._models_body: dict[str, Any] | None = None
        self._tracker = tracker
        self._api_keys = APIKeys.load(cfg.server.api_keys_env, cfg.server.api_keys_file)

    def flow_stats(self) -> dict[str, Any]:
        """Hand-overs and token-1 sources of the requests this front served (``stats()``)."""
        migrator = self.orchestrator.migrator
        return {"migrations": migrator.migrations if migrator is not None else 0,
                "migration_outcomes": dict(migrator.outcomes) if migrator is not None else {},
                "fallbacks": dict(self.orchestrator.fallbacks),
                **{f"token_one_{k}": v
                   for k, v in self.orchestrator.token_one_sources.items()}}

    def _to_request(self, kind: str, body: dict[str, Any]) -> Any:
        return self._request_models[kind].model_validate(body)

    def __serve_build_asgi_app__(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/completions", self._authed(self.completions), methods=["POST"]),
                Route("/v1/chat/completions", self._authed(self.chat_completions),
                      methods=["POST"]),
                Route("/v1/models", self._authed(self.list_models), methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
            ]
        )

    def _authed(self, handler):
        if not self._api_keys.enabled:
            return handler

        async def guarded(request: Request) -> Response:
            if not self._api_keys.allows(request.headers.get("authorization")):
                return error_response(
                    "missing or invalid API key: send 'Authorization: Bearer <key>'",
                    "AuthenticationError", 401)
            return await handler(request)

        return guarded

    async def completions(self, request: Request) -> Response:
        return await self._serve("completion", request)

    async def chat_completions(self, request: Request) -> Response:
        return await self._serve("chat", request)

    async def list_models(self, request: Request) -> Response:
        if self._models_body is None:
            self._models_body = await self.orchestrator.decode.models()
        return JSONResponse(self._models_body)

    async def health(self, request: Request) -> Response:
        try:
            await asyncio.wait_for(self.orchestrator.decode.check_health(), HEALTH_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - any failure means unhealthy
            return error_response(f"decode engine unhealthy: {exc}", "ServiceUnavailable", 503)
        return JSONResponse({"status": "ok"})

    async def _serve(self, kind: str, http_request: Request) -> Response:
        start = time.perf_counter()
        response, stream = await self._serve_timed(kind, http_request, start)
        metrics = self._metrics
        if metrics is not None and not isinstance(response, StreamingResponse):
            route = response.headers.get(ROUTE_HEADER) or NO_ROUTE
            record = BackgroundTask(metrics.answered_async, start, response.status_code,
                                    route, stream, time.perf_counter())
            if response.background is None:  # recorded after the response is sent
                response.background = record
            else:
                await record()
        return response

    async def _serve_timed(self, kind: str, http_request: Request, start: float
                           ) -> tuple[Response, bool]:
        """The response, and whether the client asked for a stream (for the metrics; a
        streamed response records its own when it ends)."""
        parsed = await self._parse(kind, http_request)
        if isinstance(parsed, Response):
            return parsed, False
        stream = bool(getattr(parsed, "stream", False))
        hint = read_route_hint(http_request.headers) if self._tracker else RouteHint()
        tracked = self._tracker.begin(parsed, hint) if self._tracker else None
        try:
            reply = await self.orchestrator.handle(kind, parsed, hint)
        except Exception as exc:  # noqa: BLE001 - engines unreachable: say so, don't 500
            if tracked is not None:
                tracked.end()
            log.error("request failed: %s: %s", type(exc).__name__, exc)
            return error_response(
                f"engines unavailable ({type(exc).__name__}); retry shortly",
                "ServiceUnavailable",
                503,
            ), stream
        headers = {ROUTE_HEADER: reply.route.value}
        if reply.chunks is None:
            if tracked is not None:
                tracked.end()
            return JSONResponse(reply.head.body, reply.head.status, headers=headers), stream
        chunks = tracked.wrap(reply.chunks) if tracked is not None else reply.chunks
        if self._metrics is not None:
            chunks = self._metrics.stream(chunks, start, reply.route.value)
        return StreamingResponse(chunks, media_type="text/event-stream", headers=headers), True

    async def _parse(self, kind: str, http_request: Request) -> Any:
        """A validated vLLM request model, or the 400 response explaining why not."""
        limits = self.cfg.server
        try:
            raw = await read_limited(http_request.stream(),
                                     http_request.headers.get("content-length"),
                                     limits.max_request_bytes, limits.body_timeout_s)
            body = parse_json_object(raw, limits.max_json_depth)
        except RequestRejected as exc:
            return error_response(exc.message, exc.err_type, exc.status)
        try:
            request = self._request_models[kind].model_validate(body)
        except Exception as exc:  # noqa: BLE001 - pydantic and vLLM validators: client input
            message, param = validation_message(exc)
            return error_response(message, param=param)
        served = self.cfg.model.served_model_name
        if request.model is not None and request.model != served:
            return error_response(
                f"model '{request.model}' does not exist; this server serves '{served}'",
                "NotFoundError",
                param="model",
            )
        return request


"""The OpenAI-compatible HTTP front: a Starlette app under ``@serve.ingress``.

Requests are parsed and validated with vLLM's own protocol models, so what vLLM rejects we
reject the same way, before any engine is touched. The P/D flow itself lives in
:mod:`app.orchestrator`; this module maps HTTP to it and Ray handles to engine clients.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from app.config import AppConfig
from app.engine_protocol import Head
from app.openai_errors import error_response, validation_message
from app.orchestrator import PDOrchestrator

log = logging.getLogger("ray.serve")

ROUTE_HEADER = "x-pd-route"
HEALTH_TIMEOUT_S = 10.0


class HandleEngineClient:
    """An :class:`app.orchestrator.EngineClient` over a Ray Serve deployment handle."""

    def __init__(self, handle: DeploymentHandle):
        self._handle = handle
        self._stream_handle = handle.options(stream=True)

    async def call_once(self, kind: str, request: Any) -> Head:
        response = self._handle.generate_once.remote(kind, request)
        try:
            return await response
        except asyncio.CancelledError:
            response.cancel()  # timeout or client gone: the engine aborts the request
            raise

    async def stream(self, kind: str, request: Any) -> AsyncIterator[Head | str]:
        generator = self._stream_handle.generate.remote(kind, request)
        finished = False
        try:
            async for item in generator:
                yield item
            finished = True
        finally:
            if not finished:
                generator.cancel()  # client disconnected: free the request's KV blocks


@serve.deployment
@serve.ingress()
class PDIngress:
    async def __init__(
        self,
        config: dict[str, Any],
        decode: DeploymentHandle,
        prefill: DeploymentHandle | None = None,
    ):
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest

        self.cfg = AppConfig.model_validate(config)
        self._request_models = {"completion": CompletionRequest, "chat": ChatCompletionRequest}
        self._decode = decode
        self.orchestrator = PDOrchestrator(
            mode=self.cfg.mode,
            decode=HandleEngineClient(decode),
            prefill=HandleEngineClient(prefill) if prefill is not None else None,
            prefill_timeout_s=self.cfg.routing.prefill_timeout_s,
        )
        self._models_body: dict[str, Any] | None = None

    def __serve_build_asgi_app__(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                Route("/v1/models", self.list_models, methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
            ]
        )

    async def completions(self, request: Request) -> Response:
        return await self._serve("completion", request)

    async def chat_completions(self, request: Request) -> Response:
        return await self._serve("chat", request)

    async def list_models(self, request: Request) -> Response:
        if self._models_body is None:
            self._models_body = await self._decode.models.remote()
        return JSONResponse(self._models_body)

    async def health(self, request: Request) -> Response:
        try:
            await asyncio.wait_for(self._decode.check_health.remote(), HEALTH_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - any failure means unhealthy
            return error_response(f"decode engine unhealthy: {exc}", "ServiceUnavailable", 503)
        return JSONResponse({"status": "ok"})

    async def _serve(self, kind: str, http_request: Request) -> Response:
        parsed = await self._parse(kind, http_request)
        if isinstance(parsed, Response):
            return parsed
        try:
            reply = await self.orchestrator.handle(kind, parsed)
        except Exception as exc:  # noqa: BLE001 - engines unreachable: say so, don't 500
            log.error("request failed: %s: %s", type(exc).__name__, exc)
            return error_response(
                f"engines unavailable ({type(exc).__name__}); retry shortly",
                "ServiceUnavailable",
                503,
            )
        headers = {ROUTE_HEADER: reply.route.value}
        if reply.chunks is None:
            return JSONResponse(reply.head.body, reply.head.status, headers=headers)
        return StreamingResponse(reply.chunks, media_type="text/event-stream", headers=headers)

    async def _parse(self, kind: str, http_request: Request) -> Any:
        """A validated vLLM request model, or the 400 response explaining why not."""
        try:
            body = json.loads(await http_request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return error_response(f"request body is not valid JSON: {exc}")
        if not isinstance(body, dict):
            return error_response("request body must be a JSON object")
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

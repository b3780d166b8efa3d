"""The disaggregated request flow, independent of Ray: prefill leg, handoff, decode leg.

Engines are reached through :class:`EngineClient`; the Ray Serve ingress passes handle-backed
clients, unit tests pass fakes. Failure rules (DESIGN.md, request flow step 5): a prefill that
errors (non-4xx) or times out makes decode prefill locally; a 4xx from prefill is the client's
error and is returned as is; closing the decode stream cancels the request on the engine.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from app.engine_protocol import KIND_ERROR, KIND_JSON, KIND_STREAM, Head
from app.metrics.math import FALLBACK_OUTCOMES, prefill_outcome
from app.metrics.observer import NULL_OBSERVER, FlowObserver
from app.migration import EngineLost, Migrator
from app.pd_decision import RequestShape, Route, decide_route, fallback_on_prefill_status
from app.pd_requests import client_request, decode_request, prefill_request
from app.routing.hints import RouteHint

log = logging.getLogger("ray.serve")


class EngineClient(Protocol):
    async def call_once(self, kind: str, request: Any, **routing: Any) -> Head: ...

    def stream(self, kind: str, request: Any) -> AsyncIterator[Head | str]: ...

    async def models(self) -> dict[str, Any]: ...

    async def check_health(self) -> None: ...


@dataclass
class Reply:
    route: Route
    head: Head
    chunks: AsyncIterator[str] | None = None  # set when head.kind == "stream"


class PDOrchestrator:
    def __init__(
        self,
        mode: str,
        decode: EngineClient,
        prefill: EngineClient | None = None,
        prefill_timeout_s: float = 60.0,
        migrator: Migrator | None = None,
        observer: FlowObserver = NULL_OBSERVER,
    ):
        self.migrator = migrator
        self.observer = observer
        self.mode = mode
        self.decode = decode
        self.prefill = prefill
        self.prefill_timeout_s = prefill_timeout_s

    async def handle(self, kind: str, request: Any, hint: RouteHint | None = None) -> Reply:
        """``hint``: the KV router's choices (plan, prefill replica), if a router placed it."""
        request = client_request(request)
        hint = hint or RouteHint()
        shape = RequestShape(
            n=getattr(request, "n", 1) or 1,
            use_beam_search=bool(getattr(request, "use_beam_search", False)),
        )
        plan = hint.plan.value if hint.plan is not None else None
        route = decide_route(self.mode, shape, self.prefill is not None, plan)
        if route is Route.FALLBACK:  # meant to disaggregate, but no prefill deployment
            self.observer.fallback("no_prefill")
        elif route is Route.DISAGGREGATED:
            start = time.perf_counter()
            outcome, label = await self._run_prefill(kind, request, hint)
            self.observer.prefill_leg(label, time.perf_counter() - start)
            if label in FALLBACK_OUTCOMES:
                self.observer.fallback(label)
            if isinstance(outcome, Head):  # the client's own error, found by prefill
                return Reply(route, outcome)
            if outcome is None:
                route = Route.FALLBACK
            else:
                request = decode_request(request, outcome)
        return await self._run_decode(route, kind, request)

    async def _run_prefill(self, kind: str, request: Any, hint: RouteHint
                           ) -> tuple[dict[str, Any] | Head | None, str]:
        """KV params for decode; a Head to return to the client; or None to fall back; with
        the outcome's label (``app.metrics.math.prefill_outcome``)."""
        routing = {}
        if hint.prefill_replica:
            routing = {"prefill_replica": hint.prefill_replica,
                       "prompt_tokens": hint.prompt_tokens,
                       "predicted_cached_tokens": hint.predicted_cached_tokens}
        try:
            head = await asyncio.wait_for(
                self.prefill.call_once(kind, prefill_request(kind, request), **routing),
                self.prefill_timeout_s,
            )
        except TimeoutError:
            log.warning("prefill timed out after %.1fs; decoding with local prefill",
                        self.prefill_timeout_s)
            return None, prefill_outcome(timed_out=True)
        except Exception as exc:  # noqa: BLE001 - any prefill-side failure means fallback
            log.warning("prefill failed (%s: %s); decoding with local prefill",
                        type(exc).__name__, exc)
            return None, prefill_outcome(failed=True)
        if head.kind == KIND_ERROR:
            if not fallback_on_prefill_status(head.status):
                return head, prefill_outcome(status=head.status)
            message = ((head.body or {}).get("error") or {}).get("message")
            log.warning("prefill answered %s (%s); decoding with local prefill", head.status,
                        message)
            return None, prefill_outcome(status=head.status)
        params = (head.body or {}).get("kv_transfer_params") if head.kind == KIND_JSON else None
        if not params:
            log.warning("prefill returned no kv_transfer_params; decoding with local prefill")
            return None, prefill_outcome(has_params=False)
        return params, prefill_outcome()

    async def _run_decode(self, route: Route, kind: str, request: Any) -> Reply:
        """The decode leg; if this engine dies under it, the migrator moves it to a peer."""
        stream = self.decode.stream(kind, request)
        try:
            head = await anext(stream)
        except EngineLost:
            await stream.aclose()
            if self.migrator is None:
                raise
            head, chunks = await self.migrator.rerun(kind, request)
            return Reply(route, head, chunks)
        except BaseException:
            await stream.aclose()
            raise
        if head.kind != KIND_STREAM:
            await stream.aclose()
            return Reply(route, head)
        if self.migrator is not None:
            return Reply(route, head, self.migrator.guard(kind, request, stream))
        return Reply(route, head, stream)

"""The disaggregated request flow, independent of Ray: prefill leg, handoff, decode leg.

Engines are reached through :class:`EngineClient`; the Ray Serve ingress passes handle-backed
clients, unit tests pass fakes. Failure rules (DESIGN.md, request flow step 5): a prefill that
errors (non-4xx) or times out makes decode prefill locally; a 4xx from prefill is the client's
error and is returned as is; closing the decode stream cancels the request on the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from app.engine_protocol import KIND_ERROR, KIND_JSON, KIND_STARTED, KIND_STREAM, Head
from app.handoff.first_token import (
    PrefillToken,
    decode_continuation,
    first_chunks,
    formatter,
    ineligible,
)
from app.handoff.push import PushTarget, decode_push_params
from app.handoff.timeline import HandoffTimeline
from app.metrics.math import FALLBACK_OUTCOMES, prefill_outcome
from app.metrics.observer import NULL_OBSERVER, FlowObserver
from app.migration import DONE, EngineLost, Migrator, error_event, parse_event
from app.pd_decision import RequestShape, Route, decide_route, fallback_on_prefill_status
from app.pd_requests import client_request, decode_request, prefill_request
from app.routing.hints import RouteHint

log = logging.getLogger("ray.serve")


class EngineClient(Protocol):
    async def call_once(self, kind: str, request: Any, **routing: Any) -> Head: ...

    def stream(self, kind: str, request: Any) -> AsyncIterator[Head | str]: ...

    async def models(self) -> dict[str, Any]: ...

    async def check_health(self) -> None: ...


# The decode engine's view of a request, for the timeline: (engine-core marks, KV bytes and
# seconds of the latest NIXL read), by the request's ``request_id``.
DecodeProbe = Callable[[str], tuple[dict[str, float], int, float | None]]


@dataclass(frozen=True)
class FirstTokenPath:
    """What the first-token fast path needs (``handoff.first_token_from_prefill``)."""

    to_request: Callable[[str, dict[str, Any]], Any]  # body -> the engine's request model
    model: str
    block_size: int
    max_model_len: int = 0  # 0: unknown


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
        first_token: FirstTokenPath | None = None,
        timeline: DecodeProbe | None = None,
        push_target: Callable[[str | None], PushTarget | None] | None = None,
        push_wait_s: float = 10.0,
    ):
        """``first_token``: stream prefill's token 1 at once (app.handoff.first_token);
        ``timeline``: log each disaggregated request's handoff stages (app.handoff.timeline);
        ``push_target``: the prefill replica a pushed request goes to, given the KV router's
        pick (``handoff.transfer: push``, app.handoff.push); ``push_wait_s``: how long
        decode may wait for pushed KV after prefill answered."""
        self.push_target = push_target
        self.push_wait_s = push_wait_s
        self.fallbacks: dict[str, int] = {}  # by reason, stats
        self.first_token = first_token
        self.timeline = timeline
        self.token_one_sources = {"prefill": 0, "decode": 0}  # disaggregated streams, stats
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
        timeline = None
        if self.timeline is not None and route is not Route.FALLBACK:
            # a request one engine serves whole logs its own stages: the handoff's baseline
            timeline = HandoffTimeline(route=route.value)
            timeline.mark("received")
        if route is Route.FALLBACK:  # meant to disaggregate, but no prefill deployment
            self._fallback("no_prefill")
        elif route is Route.DISAGGREGATED:
            if timeline is not None and hint.router_marks is not None:
                timeline.mark("router_in", hint.router_marks[0])
                timeline.mark("router_out", hint.router_marks[1])
            if self.push_target is not None:
                target = self.push_target(hint.prefill_replica)
                if target is not None:
                    return await self._push(kind, request, hint, target, timeline)
                # Push engines cannot pull: before Ray's long-poll named the prefill
                # replicas (start-up), decode prefills itself.
                self._fallback("no_push_target")
                return await self._run_decode(Route.FALLBACK, kind, request)
            outcome, label = await self._prefill_leg(kind, prefill_request(kind, request),
                                                     _prefill_routing(hint))
            if isinstance(outcome, Head):  # the client's own error, found by prefill
                return Reply(route, outcome)
            if outcome is None:
                route, timeline = Route.FALLBACK, None
            else:
                if timeline is not None:
                    timeline.mark("prefill_returned")
                    timeline.engine("prefill", outcome.get("pd_engine_stamps"))
                params = outcome["kv_transfer_params"]
                if self.first_token is not None:
                    reply = await self._first_token_reply(kind, request, outcome, params,
                                                          timeline)
                    if reply is not None:
                        self._token_one("prefill")
                        return reply
                if getattr(request, "stream", False):
                    self._token_one("decode")
                request = decode_request(request, params)
        return await self._run_decode(route, kind, request, timeline)

    async def _push(self, kind: str, request: Any, hint: RouteHint, target: PushTarget,
                    timeline: HandoffTimeline | None) -> Reply:
        """Both legs at once; prefill WRITEs the KV into the blocks decode allocated meanwhile.

        The reply waits for decode's first output, so a push that cannot complete (prefill
        failed or answered a client error, decode waited ``push_wait_s`` past prefill's
        answer) is abandoned before anything reached the client: decode's leg is cancelled
        and the request decodes with local prefill, or the client's error is returned, as on
        the pull path.

        The prefill call itself is never cancelled (``detached``): vLLM keeps a cancelled
        decode leg's blocks until the KV it registered for arrives, and only prefill's WRITE
        brings it, so an aborted prefill would leave those blocks held for good."""
        rid = uuid.uuid4().hex
        leg = prefill_request(kind, request).model_copy(update={"request_id": rid})
        pushed = request.model_copy(update={
            "request_id": rid, "kv_transfer_params": decode_push_params(target, kind, rid)})
        prefill = asyncio.create_task(
            self._prefill_leg(kind, leg, _prefill_routing(hint, target.replica), detached=True))
        if timeline is not None:
            prefill.add_done_callback(functools.partial(_note_prefill, timeline))
        stream = self.decode.stream(kind, pushed)
        try:
            # A stream's Head comes before decode runs, a whole answer only at its end: decode
            # marks the moment it put out token 1 for it (KIND_STARTED, app.engine_host).
            head = await self._unless_push_fails(anext(stream), prefill, self.push_wait_s)
            if head.kind == KIND_STARTED:
                head = await anext(stream)
            first = None
            if head.kind == KIND_STREAM:
                first = await self._unless_push_fails(anext(stream), prefill,
                                                      self.push_wait_s)
        except _PushAbandoned as why:
            await stream.aclose()
            if isinstance(why.outcome, Head):  # the client's own error, found by prefill
                return Reply(Route.DISAGGREGATED, why.outcome)
            log.warning("pushed KV did not arrive (%s); decoding with local prefill", why)
            return await self._run_decode(Route.FALLBACK, kind, request)
        except EngineLost:  # this decode engine died: a peer prefills and decodes it
            prefill.cancel()
            await stream.aclose()
            return await self._run_decode(Route.FALLBACK, kind, request)
        except BaseException:
            prefill.cancel()
            await stream.aclose()
            raise
        if head.kind != KIND_STREAM:
            await stream.aclose()
            if head.kind == KIND_ERROR:  # decode refused it: nothing to prefill for
                prefill.cancel()
            return Reply(Route.DISAGGREGATED, head)
        if "error" in (parse_event(first) or {}):
            # vLLM checks the prompt's tokens only when the stream starts: a bad prompt is an
            # error event here but a 4xx from prefill; a failed push is retried locally.
            await stream.aclose()
            outcome, _ = await prefill
            if isinstance(outcome, Head):
                return Reply(Route.DISAGGREGATED, outcome)
            log.warning("pushed decode leg failed before its first token (%s); decoding with "
                        "local prefill", first.strip()[:200])
            self._fallback("push_failed")
            return await self._run_decode(Route.FALLBACK, kind, request)
        self._token_one("decode")
        chunks = _prepend(first, stream)
        if timeline is not None:
            chunks = self._timed(chunks, timeline, rid, prefill)
        # A migration continues from the client's request: the pushed KV is decode's own now.
        plain = request.model_copy(update={"request_id": rid})
        return Reply(Route.DISAGGREGATED, head, self._guarded(kind, plain, chunks, False))

    async def _unless_push_fails(self, step: Any, prefill: asyncio.Task, wait_s: float) -> Any:
        """``step`` (decode's next output), unless the prefill leg fails first or decode
        outlives prefill's answer by ``wait_s``: then :class:`_PushAbandoned`."""
        step = asyncio.ensure_future(step)
        try:
            await asyncio.wait({step, prefill}, return_when=asyncio.FIRST_COMPLETED)
            if step.done():
                return step.result()
            outcome, label = prefill.result()
            if isinstance(outcome, dict):  # prefill done: the WRITE is on its way
                try:
                    return await asyncio.wait_for(asyncio.shield(step), wait_s)
                except TimeoutError:
                    self._fallback("push_timeout")
                    raise _PushAbandoned(None, f"no KV {wait_s:g}s after prefill "
                                         "answered") from None
            raise _PushAbandoned(outcome, label)
        finally:
            if not step.done():
                step.cancel()
                with contextlib.suppress(BaseException):
                    await step

    def _fallback(self, reason: str) -> None:
        self.fallbacks[reason] = self.fallbacks.get(reason, 0) + 1
        self.observer.fallback(reason)

    def _token_one(self, source: str) -> None:
        self.token_one_sources[source] += 1
        self.observer.token_one(source)

    async def _prefill_leg(self, kind: str, leg: Any, routing: dict[str, Any],
                           detached: bool = False) -> tuple[dict[str, Any] | Head | None, str]:
        """``_run_prefill``, observed (its duration and outcome; fallbacks counted)."""
        start = time.perf_counter()
        outcome, label = await self._run_prefill(kind, leg, routing, detached)
        self.observer.prefill_leg(label, time.perf_counter() - start)
        if label in FALLBACK_OUTCOMES:
            self._fallback(label)
        return outcome, label

    async def _run_prefill(self, kind: str, leg: Any, routing: dict[str, Any],
                           detached: bool = False) -> tuple[dict[str, Any] | Head | None, str]:
        """Prefill's answer (with ``kv_transfer_params`` for decode); a Head to return to the
        client; or None to fall back; with the outcome's label
        (``app.metrics.math.prefill_outcome``). ``detached``: neither the timeout nor the
        caller's cancellation cancels the call on the prefill engine."""
        call = self.prefill.call_once(kind, leg, **routing)
        try:
            head = await asyncio.wait_for(_detached(call) if detached else call,
                                          self.prefill_timeout_s)
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
        return head.body, prefill_outcome()

    async def _first_token_reply(self, kind: str, request: Any, answer: dict[str, Any],
                                 params: dict[str, Any], timeline: HandoffTimeline | None
                                 ) -> Reply | None:
        """Token 1 from prefill now, decode's continuation after it; None: take the usual
        path (the request or prefill's answer does not qualify)."""
        path = self.first_token
        body = request.model_dump()
        first = PrefillToken.parse(kind, answer)
        why = ineligible(kind, body) or ("prefill returned no token ids" if first is None
                                         else first.continues(path.block_size,
                                                              path.max_model_len))
        if why is not None:
            log.debug("token 1 from decode: %s", why)
            return None
        try:
            cont = path.to_request("completion", decode_continuation(kind, body, first,
                                                                     path.model, params))
        except Exception as exc:  # noqa: BLE001 - the usual path then answers as it would
            log.warning("continuation after token 1 invalid (%s); token 1 from decode", exc)
            return None
        fmt = formatter(kind, body, first, path.model)
        return Reply(Route.DISAGGREGATED, Head(KIND_STREAM),
                     self._after_token_one(first_chunks(kind, body, first, fmt), fmt, cont,
                                           timeline))

    async def _after_token_one(self, events: list[str], fmt: Any, cont: Any,
                               timeline: HandoffTimeline | None) -> AsyncIterator[str]:
        """Token 1's events, then decode's continuation rewritten into the client's stream.
        Decode is asked once token 1 is handed to the server (starting it earlier would put
        its request parsing on this event loop ahead of token 1's write); a client gone by
        then still gets prefill's blocks released (closing the opened stream does that)."""
        stream, asked = None, False
        try:
            for event in events:
                yield event
            if timeline is not None:
                timeline.mark("first_chunk")
            asked = True
            try:
                head, stream, rerun = await self._open_decode("completion", cont)
            except Exception as exc:  # noqa: BLE001 - token 1 is out: end the stream cleanly
                log.warning("decode could not continue after token 1: %s: %s",
                            type(exc).__name__, exc)
                yield error_event("the decode engine could not continue this request "
                                  f"({type(exc).__name__}); retry the request")
                yield DONE
                return
            if stream is None:
                yield error_event(f"the decode engine refused to continue: "
                                  f"{json.dumps(head.body)[:300]}")
                yield DONE
                return
            async for chunk in self._guarded("completion", cont, stream, rerun):
                data = parse_event(chunk)
                if data is None:
                    continue  # [DONE]: ours comes last
                if "error" in data:
                    yield chunk
                    continue
                event, _ = fmt.convert(data)
                if timeline is not None:
                    self._emit_timeline(timeline, getattr(cont, "request_id", ""))
                    timeline = None
                if event is not None:
                    yield event
            yield DONE
        finally:
            if not asked:  # gone before decode was asked: open it only to release
                with contextlib.suppress(BaseException):
                    _, stream, _ = await self._open_decode("completion", cont)
            if stream is not None:
                await stream.aclose()

    def _emit_timeline(self, timeline: HandoffTimeline, request_key: str) -> None:
        timeline.mark("decode_first_chunk")
        stamps, kv_bytes, kv_read_s = self.timeline(request_key)
        timeline.engine("decode", stamps)
        timeline.kv_bytes, timeline.kv_read_s = kv_bytes, kv_read_s
        log.info("pd_timeline %s", json.dumps(timeline.record(), separators=(",", ":")))

    async def _run_decode(self, route: Route, kind: str, request: Any,
                          timeline: HandoffTimeline | None = None) -> Reply:
        """The decode leg; if this engine dies under it, the migrator moves it to a peer."""
        head, stream, rerun = await self._open_decode(kind, request)
        chunks = self._guarded(kind, request, stream, rerun)
        if chunks is not None and timeline is not None:
            chunks = self._timed(chunks, timeline, getattr(request, "request_id", ""))
        return Reply(route, head, chunks)

    async def _open_decode(self, kind: str, request: Any
                           ) -> tuple[Head, AsyncIterator[str] | None, bool]:
        """Decode's Head, its stream (None if not streaming), and whether that is a peer's
        re-run because this engine is already dead."""
        stream = self.decode.stream(kind, request)
        try:
            head = await anext(stream)
        except EngineLost:
            await stream.aclose()
            if self.migrator is None:
                raise
            return (*await self.migrator.rerun(kind, request), True)
        except BaseException:
            await stream.aclose()
            raise
        if head.kind != KIND_STREAM:
            await stream.aclose()
            return head, None, False
        return head, stream, False

    def _guarded(self, kind: str, request: Any, stream: AsyncIterator[str] | None,
                 rerun: bool) -> AsyncIterator[str] | None:
        """This engine's stream, continued on a peer if the engine dies under it."""
        if stream is None or rerun or self.migrator is None:
            return stream
        return self.migrator.guard(kind, request, stream)

    async def _timed(self, chunks: AsyncIterator[str], timeline: HandoffTimeline,
                     request_key: str, prefill: asyncio.Task | None = None
                     ) -> AsyncIterator[str]:
        """``prefill``: a pushed request's prefill leg, whose marks the line waits for."""
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                if timeline is not None:
                    timeline.mark("first_chunk")
                    if prefill is not None:
                        await asyncio.wait({prefill}, timeout=1.0)
                    self._emit_timeline(timeline, request_key)
                    timeline = None
                yield chunk


_DETACHED: set[asyncio.Task] = set()  # strong references until they finish


def _detached(call: Any) -> asyncio.Future:
    """``call`` in a task of its own that cancelling the awaiter does not reach; its outcome
    is dropped if nobody waits for it any more."""
    task = asyncio.ensure_future(call)
    _DETACHED.add(task)

    def done(t: asyncio.Task) -> None:
        _DETACHED.discard(t)
        if not t.cancelled():
            t.exception()  # retrieved: a late failure is no one's to raise

    task.add_done_callback(done)
    return asyncio.shield(task)


class _PushAbandoned(Exception):
    """A pushed request's KV will not arrive; ``outcome`` is the prefill leg's (a Head: the
    client's error)."""

    def __init__(self, outcome: Any, why: str):
        super().__init__(why)
        self.outcome = outcome


def _prefill_routing(hint: RouteHint, replica: str | None = None) -> dict[str, Any]:
    """The prefill call's routing keywords: the replica it must reach (the KV router's pick,
    or the one a pushed request names) and the router's view of the prompt."""
    replica = replica or hint.prefill_replica
    if not replica:
        return {}
    return {"prefill_replica": replica, "prompt_tokens": hint.prompt_tokens,
            "predicted_cached_tokens": hint.predicted_cached_tokens}


def _note_prefill(timeline: HandoffTimeline, prefill: asyncio.Task) -> None:
    if not prefill.cancelled() and prefill.exception() is None:
        outcome, _ = prefill.result()
        if isinstance(outcome, dict):
            timeline.mark("prefill_returned")
            timeline.engine("prefill", outcome.get("pd_engine_stamps"))


async def _prepend(first: str, rest: AsyncIterator[str]) -> AsyncIterator[str]:
    async with contextlib.aclosing(rest):
        yield first
        async for chunk in rest:
            yield chunk

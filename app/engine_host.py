"""Host one vLLM ``AsyncLLM`` in this process and serve OpenAI requests through vLLM's own layer.

The deployment shells in ``app.deployments`` wrap this class; keeping it free of Ray lets the
same code run in a plain script. vLLM's serving classes do the parsing, chat templating,
tokenization, validation and output formatting, so our responses are byte-compatible with
``vllm serve``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Any

from vllm.entrypoints.serve.engine.protocol import ErrorResponse

from app.engine_protocol import KIND_ERROR, KIND_JSON, KIND_STARTED, Head, stream_after_head
from app.engine_stats import EngineStatsCollector
from app.handoff.push import is_pushed_leg
from app.handoff.timeline import EngineStampBook
from app.migration import ERROR_PREFIX, EngineLost, TokenLedger, engine_ids
from app.openai_errors import error_body

log = logging.getLogger(__name__)

_START_POLL_S = 0.02  # how often a pushed whole answer's engine is asked for its token 1


class EngineHost:
    """Owns an AsyncLLM and the vLLM OpenAI serving objects built over it."""

    def __init__(self, engine_kwargs: dict[str, Any], served_model_name: str,
                 extra_stat_loggers: list[Any] | None = None, record_stamps: bool = False):
        """``extra_stat_loggers``: vLLM stat-logger factories run beside our collector, e.g.
        ``app.metrics.vllm_logger.phase_stat_logger(phase)`` (vLLM's metrics through Ray).
        ``record_stamps``: keep each request's engine-core timestamps (the handoff timeline;
        a prefill leg's answer then carries them as ``pd_engine_stamps``)."""
        self.stamps = EngineStampBook() if record_stamps else None
        self.extra_stat_loggers = list(extra_stat_loggers or [])
        self.engine_kwargs = dict(engine_kwargs)
        self.served_model_name = served_model_name
        self.engine = None
        self._stats: EngineStatsCollector | None = None
        self._completion = None
        self._chat = None
        self._models = None
        self.ledger = TokenLedger()

    async def start(self) -> None:
        from starlette.datastructures import State
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.cli_args import FrontendArgs
        from vllm.sampling_params import RequestOutputKind
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.executor.abstract import Executor

        kwargs = {"served_model_name": [self.served_model_name], **self.engine_kwargs}
        engine_args = AsyncEngineArgs(**kwargs)
        vllm_config = engine_args.create_engine_config(UsageContext.OPENAI_API_SERVER)

        def stats_factory(config, engine_index=0):
            self._stats = EngineStatsCollector(config, engine_index)
            return self._stats

        self.engine = AsyncLLM(
            vllm_config=vllm_config,
            executor_class=Executor.get_class(vllm_config),
            log_stats=True,
            log_requests=False,
            stat_loggers=[stats_factory, *self.extra_stat_loggers],
        )
        # vLLM's serving layer calls engine.generate: the ledger sees every output on its way.
        self.engine.generate = self.ledger.wrap(
            self.engine.generate, lambda p: p.output_kind == RequestOutputKind.DELTA)
        if self.stamps is not None:
            self.engine.generate = self.stamps.wrap(self.engine.generate)
        args = argparse.Namespace(**(vars(FrontendArgs()) | vars(engine_args)))
        state = State()
        tasks = await self.engine.get_supported_tasks()
        await init_app_state(self.engine, state, args, supported_tasks=tasks)
        self._completion = state.openai_serving_completion
        self._chat = state.openai_serving_chat
        self._models = state.openai_serving_models

    async def check_health(self) -> None:
        await self.engine.check_health()

    async def models(self) -> dict[str, Any]:
        return (await self._models.show_available_models()).model_dump()

    @property
    def block_size(self) -> int:
        return int(self.engine.vllm_config.cache_config.block_size)

    @property
    def max_model_len(self) -> int:
        return int(self.engine.vllm_config.model_config.max_model_len)

    def output_started(self, request_key: str) -> bool:
        """Whether the engine has put out a token for the request whose client-level id is
        ``request_key``. vLLM's frontend sees every engine output, also of a non-streamed
        request whose answer it returns only at the end, so this tells a whole request still
        waiting for its KV from one that runs (the push wait, app.orchestrator)."""
        processor = getattr(self.engine, "output_processor", None)
        if processor is None:
            return False
        for external in engine_ids(request_key):
            for internal in processor.external_req_ids.get(external, ()):
                state = processor.request_states.get(internal)
                if state is not None and not state.is_prefilling:
                    return True
        return False

    def engine_stamps(self, request_key: str) -> dict[str, float]:
        """Engine-core marks of the request whose client-level id is ``request_key``."""
        return self.stamps.lookup(engine_ids(request_key)) if self.stamps else {}

    @property
    def stats_collector(self) -> EngineStatsCollector:
        return self._stats

    def stats(self) -> dict[str, Any]:
        return self._stats.snapshot() if self._stats else {}

    def engine_dead(self) -> bool:
        return self.engine is not None and self.engine.errored

    async def generate(self, kind: str, request: Any) -> AsyncIterator[Head | str]:
        """Run one completion or chat request; yield a Head, then SSE strings if streaming
        (a whole answer to a pushed leg is preceded by a ``KIND_STARTED`` Head). Raises
        :class:`EngineLost` if this engine dies under the request (app.migration)."""
        serving = self._chat if kind == "chat" else self._completion
        create = serving.create_chat_completion if kind == "chat" else serving.create_completion
        key = getattr(request, "request_id", None) or ""
        if self.stamps is not None and key:
            self.stamps.note(key, {"replica_in": time.monotonic()})
        try:
            if getattr(request, "stream", False) or not is_pushed_leg(
                    getattr(request, "kv_transfer_params", None)):
                result = await create(request)
            else:  # a whole answer awaiting pushed KV: tell the front when its token 1 is out
                call = asyncio.ensure_future(create(request))
                try:
                    if await self._started_before(call, key):
                        yield Head(KIND_STARTED)
                    result = await call
                finally:
                    call.cancel()  # the consumer left: vLLM aborts the request
        except Exception as exc:  # noqa: BLE001 - vLLM raises typed errors; map them to HTTP
            self._lost_if_dead(key)
            err = serving.create_error_response(exc)
            yield Head(KIND_ERROR, err.error.code, err.model_dump())
            return
        if isinstance(result, ErrorResponse):
            self._lost_if_dead(key)
            yield Head(KIND_ERROR, result.error.code, result.model_dump())
            return
        if not hasattr(result, "__aiter__"):  # a whole CompletionResponse/ChatCompletionResponse
            body = result.model_dump()
            if self.stamps is not None and body.get("kv_transfer_params"):  # a prefill leg
                body["pd_engine_stamps"] = self.engine_stamps(key) | {
                    "replica_out": time.monotonic()}
            yield Head(KIND_JSON, 200, body)
            return
        release = functools.partial(self._release_remote_prefill, request)
        chunks = self._watch(result, key)
        async with contextlib.aclosing(stream_after_head(chunks, release)) as items:
            async for item in items:
                yield item

    async def _started_before(self, call: asyncio.Future, key: str) -> bool:
        """Whether the engine put out a token for the request before ``call`` (its whole
        answer) ended; asked every ``_START_POLL_S``."""
        while not call.done():
            await asyncio.wait({call}, timeout=_START_POLL_S)
            if not call.done() and self.output_started(key):
                return True
        return False

    def _lost_if_dead(self, key: str) -> None:
        taken = self.ledger.take(key) if key else None
        if self.engine_dead():
            raise EngineLost(*(taken or ([], [])))

    async def _watch(self, chunks: AsyncIterator[str], key: str) -> AsyncIterator[str]:
        """vLLM turns an engine failure into an error event: if the engine is dead, raise
        :class:`EngineLost` with what was generated instead, so a peer can continue."""
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                if chunk.startswith(ERROR_PREFIX):
                    self._lost_if_dead(key)
                yield chunk

    async def _release_remote_prefill(self, request: Any) -> None:
        """Tell the connector that a decode request carrying remote-prefill KV will never run,
        so the prefill engine frees those blocks now rather than when its lease expires."""
        params = getattr(request, "kv_transfer_params", None)
        if not params or not params.get("do_remote_prefill") or self.engine is None:
            return
        if is_pushed_leg(params):
            # Prefill holds nothing for decode before decode registered its blocks, and
            # vLLM's push worker sends nothing for a rejected request.
            return
        try:
            await self.engine.notify_kv_transfer_request_rejected(
                f"abandoned-{uuid.uuid4().hex}", params)
        except Exception as exc:  # noqa: BLE001 - best effort: the lease frees them later
            log.warning("could not release remote prefill blocks: %s: %s",
                        type(exc).__name__, exc)

    async def generate_once(self, kind: str, request: Any) -> Head:
        """Non-streaming call (the prefill leg): the single Head with the full body."""
        async for item in self.generate(kind, request):
            return item
        return Head(
            KIND_ERROR,
            HTTPStatus.INTERNAL_SERVER_ERROR,
            error_body("engine returned nothing", "InternalServerError", 500),
        )

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None

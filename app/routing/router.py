"""The KV-aware ingress request router: HAProxy asks it where each request goes.

Ray's HAProxy ingress calls ``POST /internal/route`` on this deployment with the request body
(``RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY=1``) and forwards the request to the decode
replica named in the answer, with the answer's ``x-serve-router-*`` headers set (HAProxy strips
client-sent ones, so the decode replica can trust them). Per request it:

1. renders the prompt into the engine's token ids and block hashes (:mod:`.prompt_hashing`);
2. asks both pools' KV indexes how many leading blocks each replica holds (:mod:`.kv_index`,
   fed by the engines' KV events through :mod:`.feed`), and each replica's load
   (:mod:`.load`, fed by the replicas' reports);
3. decides decode replica, local or remote prefill, prefill replica (:mod:`.policy`);
4. books the request's load and predicted blocks on the chosen replicas (bursts of siblings
   stick before their events arrive), and answers.

The decode replica reads the headers (:func:`app.routing.hints.read_route_hint`); the prefill
choice travels on to :class:`app.routing.pool_routers.PrefillPoolRouter` as a handle-call
keyword.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
import time
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from app.config import AppConfig
from app.routing import replica_registry
from app.routing.feed import Endpoints, EventFeed
from app.routing.hints import (
    HEADER_CACHED_TOKENS,
    HEADER_MARKS,
    HEADER_PLAN,
    HEADER_PREFILL,
    HEADER_PROMPT_TOKENS,
    marks_header,
)
from app.routing.kv_index import KVIndex
from app.routing.load import LoadBook
from app.routing.metrics import inc, router_metrics
from app.routing.policy import Candidate, PrefillPlan, blocks, decide
from app.routing.prompt_hashing import BlockHasher, NotRoutable, PromptTokenizer

log = logging.getLogger("ray.serve")

class KVRouter:
    """Shell over the pure pieces; one replica per proxy node (Ray places it)."""

    async def __init__(self, config: dict[str, Any], decode: Any, prefill: Any = None):
        cfg = self.cfg = AppConfig.model_validate(config)
        self.weights = cfg.routing.weights()
        decode_role = "aggregated" if cfg.mode == "aggregated" else "decode"
        self.tokenizer = await asyncio.to_thread(
            PromptTokenizer, cfg.engine_kwargs(decode_role, "cpu"), cfg.model.served_model_name)
        self.block_size = self.tokenizer.block_size
        self.hasher = BlockHasher(self.block_size, self.tokenizer.hash_algo)
        self.lock = threading.Lock()
        self.loads = LoadBook(stale_after_s=cfg.routing.replica_stale_s)
        self.pools: dict[str, dict[str, dict[str, Any]]] = {"decode": {}, "prefill": {}}
        self.index = {pool: KVIndex(predicted_ttl_s=cfg.routing.predicted_ttl_s)
                      for pool in self.pools}
        self.feeds = {pool: EventFeed(self.index[pool], self.loads, self.lock)
                      for pool in self.pools}
        self._deployments = {decode.deployment_id.name: "decode"}
        if prefill is not None:
            self._deployments[prefill.deployment_id.name] = "prefill"
        self.decisions: dict[str, int] = {}
        replica_registry.on_change(self._on_replicas)
        for handle in (decode, prefill):
            if handle is not None:
                handle._init()  # starts the long-poll that creates the pool routers here

    def _on_replicas(self, deployment: str, replicas: dict[str, dict[str, Any]]) -> None:
        pool = self._deployments.get(deployment)
        if pool is None:
            return
        self.pools[pool] = replicas
        self.feeds[pool].sync({
            rid: Endpoints(meta.get("kv_events"), meta.get("kv_replay"), meta.get("load"))
            for rid, meta in replicas.items()})

    def __serve_build_asgi_app__(self) -> Starlette:
        return Starlette(routes=[Route("/internal/route", self.route, methods=["POST"])])

    async def route(self, request: Request) -> Response:
        start, received = time.perf_counter(), time.monotonic()
        body = _json_object(await request.body())
        try:
            if body is None:
                raise NotRoutable("body is not a JSON object")
            token_ids = await self.tokenizer.token_ids(body)
            hashes = self.hasher.hashes(token_ids, body.get("cache_salt"))
        except NotRoutable:
            token_ids, hashes = [], []
        answer = self.decide(len(token_ids), hashes, routable=bool(token_ids))
        if answer is None:
            return JSONResponse({"error": "no live decode replica"}, status_code=503)
        elapsed_ms = (time.perf_counter() - start) * 1000
        m = router_metrics()
        m["latency"].observe(elapsed_ms)
        m["decisions"].inc(tags={"route": answer["request_headers"].get(HEADER_PLAN, "none")})
        if self.cfg.handoff.timeline:
            answer["request_headers"][HEADER_MARKS] = marks_header(received, time.monotonic())
        return JSONResponse(answer)

    def decide(self, prompt_tokens: int, hashes: list[int], routable: bool = True
               ) -> dict[str, Any] | None:
        """Choose replicas, book the choice; the /internal/route answer (None: no replica)."""
        with self.lock:
            decode_pool = self._candidates("decode", hashes)
            if not decode_pool:
                return None
            prefill_pool = self._candidates("prefill", hashes)
            d = decide(prompt_tokens, self.block_size, decode_pool, prefill_pool, self.weights)
            prefill_tokens = prompt_tokens - d.decode.cached_blocks * self.block_size
            remote = d.plan is PrefillPlan.REMOTE and d.prefill is not None
            self.loads.book(d.decode.replica, 0 if remote else prefill_tokens,
                            blocks(prompt_tokens, self.block_size))
            self.index["decode"].predict(d.decode.replica, hashes)
            if remote:
                self.loads.book(d.prefill.replica,
                                prompt_tokens - d.prefill.cached_blocks * self.block_size, 0)
                self.index["prefill"].predict(d.prefill.replica, hashes)
        headers = {HEADER_PROMPT_TOKENS: str(prompt_tokens)}
        if routable and self.cfg.mode != "aggregated":
            headers[HEADER_PLAN] = d.plan.value
            prefiller = d.prefill if remote else d.decode
            headers[HEADER_CACHED_TOKENS] = str(prefiller.cached_blocks * self.block_size)
            if remote:
                headers[HEADER_PREFILL] = d.prefill.replica
            self.decisions[d.plan.value] = self.decisions.get(d.plan.value, 0) + 1
            m = router_metrics()
            pool = "prefill" if remote else "decode"
            inc(m["predicted"], prefiller.cached_blocks * self.block_size, {"pool": pool})
            inc(m["prompt"], prompt_tokens, {"pool": pool})
        return {"replica_id": d.decode.replica, "request_headers": headers}

    def _candidates(self, pool: str, hashes: list[int]) -> list[Candidate]:
        live = [r for r in self.pools[pool] if self.loads.alive(r)]
        random.shuffle(live)  # exact ties go to a random replica
        cached = self.index[pool].overlaps(hashes, live) if hashes else {}
        return [Candidate(r, cached.get(r, 0), self.loads.load(r)) for r in live]

    async def state(self) -> dict[str, Any]:
        """What the router believes, with each replica's last report (tests, debugging)."""
        with self.lock:
            return {
                "pools": {pool: {r: {"alive": self.loads.alive(r),
                                     "blocks": self.index[pool].num_blocks(r),
                                     "report": self.loads.last_report(r)}
                                 for r in replicas}
                          for pool, replicas in self.pools.items()},
                "decisions": dict(self.decisions),
                "registry": replica_registry.snapshot(),
                "feeds": {pool: dict(feed.counters) for pool, feed in self.feeds.items()},
            }

    def __del__(self):
        for feed in getattr(self, "feeds", {}).values():
            feed.close()


def _json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) else None

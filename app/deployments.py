"""Ray Serve deployments hosting one vLLM engine each: thin shells over :class:`EngineHost`.

``PrefillServer`` and ``DecodeServer`` run NixlConnector engines (prefill keeps blocks for a
remote reader; decode reads them, recomputing if a read fails); ``AggregatedServer`` is a plain
engine doing both phases, the baseline. All three share :class:`EngineServer`. The decode and
aggregated replicas are also the app's HTTP ingress (:class:`EngineFront`), so streamed tokens
never cross a Ray hop.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from app.config import AppConfig, PhaseConfig, parse_core_spec
from app.cpu_pinning import describe_affinity, engine_pids, pin_process_tree
from app.diagnostics import heap_report
from app.engine_clients import HandleEngineClient, LocalEngineClient, prefill_client
from app.engine_dtype import engine_dtype_args
from app.engine_host import EngineHost
from app.engine_process import (
    KV_EVENTS_BIND_ENV,
    KV_READS_FIRST_ENV,
    KV_READY_AT_ONCE_ENV,
    KV_WAIT_SLEEP_ENV,
    NIXL_DELAY_ENV,
    PUSH_COMPLETE_EARLY_ENV,
    PUSH_EARLY_BLOCKS_ENV,
    PUSH_NOTIF_POLL_ENV,
    PUSH_REFUSALS_ENV,
    PUSH_SOURCE_PROBE_ENV,
    SHM_BUSY_LOOP_ENV,
    setup_engine_process,
)
from app.engine_protocol import Head
from app.handoff.prefill_plane import PlaneServer
from app.handoff.push import PushTarget
from app.ingress import OpenAIFront
from app.metrics.math import phase_label
from app.metrics.ray_metrics import EngineMetrics
from app.metrics.vllm_logger import phase_stat_logger, refresh_gauges, serve_tags
from app.ports import listen_port
from app.routing.hints import RouteHint
from app.routing.metrics import record_prediction
from app.routing.policy import PrefillPlan
from app.routing.publisher import InFlight, LoadPublisher, RequestTracker
from app.routing.router import KVRouter

log = logging.getLogger("ray.serve")

GAUGE_REFRESH_S = 1.0  # Ray drops a gauge series not set for 2 report intervals (>= 2 s)


def _kv_buffer_device(setting: str) -> str:
    if setting != "auto":
        return setting
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


class EngineServer:
    role = "aggregated"

    async def __init__(self, config: dict[str, Any]):
        cfg = self.cfg = AppConfig.model_validate(config)
        phase: PhaseConfig = getattr(cfg, self.role)
        rank = _replica_rank()
        self.cores = _cores_for(phase, rank)
        self._prepare_environment(cfg, phase)
        setup_engine_process()
        kv_device = _kv_buffer_device(cfg.nixl.kv_buffer_device)
        engine_kwargs = cfg.engine_kwargs(self.role, kv_device)
        engine_kwargs.update(engine_dtype_args(engine_kwargs))
        self.kv_router = cfg.routing.policy == "kv"
        self._metadata: dict[str, Any] = {"role": self.role}
        if self.kv_router:
            engine_kwargs["kv_events_config"] = self._kv_events_config(cfg)
        phase_name = phase_label(self.role)
        loggers = [phase_stat_logger(phase_name, tuple(sorted(serve_tags().items())))
                   ] if cfg.metrics.engine_metrics else []
        self.host = EngineHost(engine_kwargs, cfg.model.served_model_name, loggers,
                               record_stamps=cfg.handoff.timeline)
        await self.host.start()
        if cfg.metrics.enabled:
            self.host.stats_collector.metrics = EngineMetrics(phase_name)
        if cfg.metrics.enabled or cfg.metrics.engine_metrics:
            self._gauge_task = asyncio.get_running_loop().create_task(self._refresh_gauges())
        if self.cores:
            pin_process_tree(self.cores, engine_pids())
        self.tracker: RequestTracker | None = None
        if self.kv_router:
            self._start_load_reports(cfg)
        self.plane: PlaneServer | None = None
        if self.role == "prefill" and cfg.uses_prefill_plane:
            self.plane = PlaneServer(self.generate_once, cfg.routing.advertise_host or _node_ip(),
                                     cfg.routing.bind_host)
            await self.plane.start()
            self._metadata["prefill_plane"] = self.plane.endpoint()
            if cfg.push_transfer:  # what decode legs name to be pushed to (app/handoff/push.py)
                vllm_config = self.host.engine.vllm_config
                self._metadata["prefill_plane"]["push"] = PushTarget.advertised(
                    vllm_config.kv_transfer_config.engine_id,
                    os.environ["VLLM_NIXL_SIDE_CHANNEL_HOST"],
                    int(os.environ["VLLM_NIXL_SIDE_CHANNEL_PORT"]),
                    vllm_config.parallel_config.tensor_parallel_size)
        log.info("%s replica %s ready (cores=%s)", self.role, rank, sorted(self.cores or []))

    async def _refresh_gauges(self) -> None:
        """Keep gauges alive while the engine idles (Ray drops unrefreshed gauge series)."""
        while True:
            await asyncio.sleep(GAUGE_REFRESH_S)
            engine = self.host.stats_collector.metrics
            if engine is not None:
                engine.refresh()
            if self.cfg.metrics.engine_metrics:
                refresh_gauges()

    def _prepare_environment(self, cfg: AppConfig, phase: PhaseConfig) -> None:
        """Engine processes are spawned from this one and inherit its environment."""
        env = os.environ
        env.pop("PYTHONTRACEMALLOC", None)  # traces this replica (diagnostics), not engines
        env.setdefault("VLLM_LOGGING_LEVEL", cfg.log_level)
        env[NIXL_DELAY_ENV] = str(cfg.nixl_progress_delay_us(self.role))
        if cfg.engine_process.shm_busy_loop_s is not None:
            env[SHM_BUSY_LOOP_ENV] = str(cfg.engine_process.shm_busy_loop_s)
        _set_env(env, KV_WAIT_SLEEP_ENV, cfg.kv_wait_sleep_s(self.role))
        env[KV_READS_FIRST_ENV] = "1" if cfg.reads_before_forward(self.role) else "0"
        _set_env(env, PUSH_NOTIF_POLL_ENV, cfg.push_notif_poll_s(self.role))
        env[PUSH_EARLY_BLOCKS_ENV] = "1" if cfg.push_early_blocks(self.role) else "0"
        env[PUSH_COMPLETE_EARLY_ENV] = "1" if cfg.push_complete_early(self.role) else "0"
        _set_env(env, PUSH_SOURCE_PROBE_ENV, cfg.push_source_probe_s(self.role))
        env[PUSH_REFUSALS_ENV] = self.role if cfg.push_refusals(self.role) else ""
        env[KV_READY_AT_ONCE_ENV] = "1" if cfg.kv_ready_at_once(self.role) else "0"
        if cfg.nixl.side_channel_host:
            env["VLLM_NIXL_SIDE_CHANNEL_HOST"] = cfg.nixl.side_channel_host
            env.setdefault("VLLM_HOST_IP", cfg.nixl.side_channel_host)
        elif self.role != "aggregated":
            # vLLM's default (localhost) cannot be reached from other nodes; the node IP is
            # the cluster-internal address (bound there, not on every interface).
            env.setdefault("VLLM_NIXL_SIDE_CHANNEL_HOST", _node_ip())
        if self.role != "aggregated":
            host = env.get("VLLM_NIXL_SIDE_CHANNEL_HOST", "0.0.0.0")
            env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(listen_port(host))
        if self.cores:
            env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in sorted(self.cores))
        env.update(phase.env)

    async def generate(self, kind: str, request: Any, exclude_replica: str | None = None
                       ) -> AsyncIterator[Head | str]:
        """``exclude_replica``: read by the request router only (a migration's origin)."""
        async for item in self.host.generate(kind, request):
            yield item

    async def generate_once(self, kind: str, request: Any, prefill_replica: str | None = None,
                            prompt_tokens: int = 0, predicted_cached_tokens: int = 0) -> Head:
        """The prefill leg. The routing keywords are the KV router's choice: Ray's request
        router (``PrefillPoolRouter``) already sent the call to ``prefill_replica``."""
        if self.tracker is None:
            return await self.host.generate_once(kind, request)
        hint = RouteHint(PrefillPlan.REMOTE, prefill_replica, prompt_tokens,
                         predicted_cached_tokens)
        tracked = self.tracker.begin(request, hint, prefills_here=True)
        try:
            return await self.host.generate_once(kind, request)
        finally:
            tracked.end()

    # --- KV-aware routing: what the router subscribes to -------------------------------------

    def _kv_events_config(self, cfg: AppConfig) -> dict[str, Any]:
        """vLLM's publisher binds, the router connects to the advertised address. Bound on
        ``routing.bind_host`` (default: the advertised, cluster-internal address); a host
        other than ``*`` needs the engine-process patch, since vLLM would connect there."""
        host = cfg.routing.advertise_host or _node_ip()
        bind = cfg.routing.bind_host or host
        probe = "0.0.0.0" if bind == "*" else bind
        first = listen_port(probe)
        second = next(p for p in iter(lambda: listen_port(probe), None) if p != first)
        if bind != "*":
            os.environ[KV_EVENTS_BIND_ENV] = "1"  # inherited by the engine-core process
        self._metadata.update(kv_events=f"tcp://{host}:{first}",
                              kv_replay=f"tcp://{host}:{second}")
        return {"enable_kv_cache_events": True, "publisher": "zmq",
                "endpoint": f"tcp://{bind}:{first}", "replay_endpoint": f"tcp://{bind}:{second}"}

    def _start_load_reports(self, cfg: AppConfig) -> None:
        host = cfg.routing.advertise_host or _node_ip()
        bind = cfg.routing.bind_host or host
        self.publisher = LoadPublisher(self._load_report, host, bind_host=bind)
        collector = self.host.stats_collector
        collector.arrivals_at_finish = False  # the router's hints say it on arrival instead
        self.inflight = InFlight(on_change=self.publisher.changed,
                                 on_begin=collector.signals.observe_arrival)
        collector.listener = self.publisher.changed
        self.tracker = RequestTracker(self.inflight, self.role, collector.expect_finish,
                                      record_prediction)
        self._metadata["load"] = self.publisher.endpoint
        self.publisher.start()

    def _load_report(self) -> dict[str, Any] | None:
        if self.host.engine_dead():  # out of routing until Ray replaces this replica
            return None
        engine = self.host.stats()
        return {
            "running": self.inflight.running,
            "queued_prefill_tokens": self.inflight.queued_prefill_tokens,
            "kv_usage": engine.get("kv_cache_usage", 0.0),
            "active_kv_blocks": round(engine.get("kv_cache_usage", 0.0)
                                      * engine.get("kv_num_blocks", 0)),
            "engine": engine,
        }

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray calls this when the deployment autoscales (``autoscaling.signals`` keys)."""
        engine = self.host.stats()
        if self.tracker is not None:
            queued = self.inflight.queued_prefill_tokens
        else:  # no router hints: waiting requests x the mean computed prompt so far
            done = max(engine.get("finished_requests", 0), 1)
            queued = engine.get("num_waiting_reqs", 0) * engine.get(
                "prompt_tokens_computed", 0) / done
        return self.host.stats_collector.signals.snapshot(engine, queued)

    def record_replica_metadata(self) -> dict[str, Any]:
        """Static, read by Ray once the replica is up: where the router subscribes."""
        return dict(self._metadata)

    async def models(self) -> dict[str, Any]:
        return await self.host.models()

    def engine_info(self) -> dict[str, int]:
        """What a front in another process needs of the engine (the first-token path)."""
        return {"block_size": self.host.block_size, "max_model_len": self.host.max_model_len}

    async def stats(self) -> dict[str, Any]:
        """Engine counters plus where its processes may run (for checks and debugging)."""
        pids = engine_pids()
        flow = self.flow_stats() if isinstance(self, OpenAIFront) else {"migrations": 0}
        return {**self.host.stats(), "role": self.role, "replica": replica_id(),
                "affinity": describe_affinity(pids), "engine_dead": self.host.engine_dead(),
                "plane_calls": self.plane.calls if self.plane is not None else 0, **flow}

    async def check_health(self) -> None:
        await self.host.check_health()

    def heap(self) -> dict[str, Any]:
        """This replica process's Python heap (app/diagnostics.py; bench/replica_heap.py)."""
        return {"replica": replica_id(), **heap_report()}

    def __del__(self):
        plane = getattr(self, "plane", None)
        if plane is not None:
            plane.close()
        publisher = getattr(self, "publisher", None)
        if publisher is not None:
            publisher.close()
        host = getattr(self, "host", None)
        if host is not None:
            host.shutdown()


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


def replica_id() -> str | None:
    try:
        return serve.get_replica_context().replica_id.to_full_id_str()
    except Exception:  # noqa: BLE001 - outside Serve
        return None


def _replica_rank() -> int:
    try:
        return serve.get_replica_context().rank.rank
    except Exception:  # noqa: BLE001 - outside Serve, or a Ray without ranks
        return 0


def _cores_for(phase: PhaseConfig, rank: int) -> set[int] | None:
    if not phase.cpu_cores:
        return None
    return parse_core_spec(phase.cpu_cores[rank % len(phase.cpu_cores)])


class EngineFront(EngineServer, OpenAIFront):
    """An engine replica that also serves HTTP: tokens go from vLLM to the socket in-process.

    With a ``prefill`` handle it runs the P/D flow (its own engine decodes); without, it is
    the aggregated server. Other replicas and tests still reach it through handles.
    """

    async def __init__(self, config: dict[str, Any], prefill: DeploymentHandle | None = None):
        await EngineServer.__init__(self, config)
        self._peers: HandleEngineClient | None = None
        self._init_front(
            self.cfg,
            LocalEngineClient(self.host),
            prefill_client(prefill, self.cfg) if prefill is not None else None,
            self.tracker,
            self._peer_stream if self.cfg.server.max_migrations > 0 else None,
            block_size=self.host.block_size,
            max_model_len=self.host.max_model_len,
            decode_probe=self._decode_probe,
        )

    def _decode_probe(self, request_key: str) -> tuple[dict[str, float], int, float | None]:
        """This engine's marks of a request and its latest NIXL read (the handoff timeline;
        the read is this request's at concurrency 1)."""
        last = self.host.stats_collector.last_transfer
        seconds = sum(last.durations_s) if last is not None and last.durations_s else None
        return (self.host.engine_stamps(request_key), last.bytes if last else 0, seconds)

    def _peer_stream(self, kind: str, request: Any) -> AsyncIterator[Head | str]:
        """The request on another replica of this deployment (a migration)."""
        if self._peers is None:
            ctx = serve.get_replica_context()
            self._peers = HandleEngineClient(
                serve.get_deployment_handle(ctx.deployment, ctx.app_name),
                self.cfg.handoff.handle_transport)
        return self._peers.stream(kind, request, exclude_replica=replica_id())


@serve.deployment
class PrefillServer(EngineServer):
    role = "prefill"


class _DecodeEngine(EngineServer):
    role = "decode"


class _AggregatedEngine(EngineServer):
    role = "aggregated"


# Engine replicas without HTTP, behind a separate front (front.mode: separate); the same
# deployment names as the HTTP-serving ones, so handles, stats and autoscaling read alike.
DecodeEngineServer = serve.deployment(_DecodeEngine, name="DecodeServer")
AggregatedEngineServer = serve.deployment(_AggregatedEngine, name="AggregatedServer")


@serve.deployment
@serve.ingress()
class DecodeServer(EngineFront):
    role = "decode"


@serve.deployment
@serve.ingress()
class AggregatedServer(EngineFront):
    role = "aggregated"


# One per proxy node (Ray places it); no CPU reserved, like Ray Serve LLM's router: it must
# not take a core from an engine, and it runs only between HAProxy and the engines.
KVRouterServer = serve.deployment(
    serve.ingress()(KVRouter), name="KVRouter", ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=1000)


def _set_env(env, name: str, value: float | None) -> None:
    """``name`` for the engine processes spawned from here; None = not set (vLLM's own)."""
    if value is None:
        env.pop(name, None)
    else:
        env[name] = str(value)

"""Ray Serve deployments hosting one vLLM engine each: thin shells over :class:`EngineHost`.

``PrefillServer`` and ``DecodeServer`` run NixlConnector engines (prefill keeps blocks for a
remote reader; decode reads them, recomputing if a read fails); ``AggregatedServer`` is a plain
engine doing both phases, the baseline. All three share :class:`EngineServer`. The decode and
aggregated replicas are also the app's HTTP ingress (:class:`EngineFront`), so streamed tokens
never cross a Ray hop.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from app.config import AppConfig, PhaseConfig, parse_core_spec
from app.cpu_pinning import describe_affinity, engine_pids, pin_process_tree
from app.engine_clients import HandleEngineClient, LocalEngineClient
from app.engine_host import EngineHost
from app.engine_process import NIXL_DELAY_ENV, SHM_BUSY_LOOP_ENV, setup_engine_process
from app.engine_protocol import Head
from app.ingress import OpenAIFront
from app.ports import free_port

log = logging.getLogger("ray.serve")


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
        self.host = EngineHost(cfg.engine_kwargs(self.role, kv_device), cfg.model.served_model_name)
        await self.host.start()
        if self.cores:
            pin_process_tree(self.cores, engine_pids())
        log.info("%s replica %s ready (cores=%s)", self.role, rank, sorted(self.cores or []))

    def _prepare_environment(self, cfg: AppConfig, phase: PhaseConfig) -> None:
        """Engine processes are spawned from this one and inherit its environment."""
        env = os.environ
        env.setdefault("VLLM_LOGGING_LEVEL", cfg.log_level)
        env[NIXL_DELAY_ENV] = str(cfg.nixl.progress_delay_us)
        if cfg.engine_process.shm_busy_loop_s is not None:
            env[SHM_BUSY_LOOP_ENV] = str(cfg.engine_process.shm_busy_loop_s)
        if cfg.nixl.side_channel_host:
            env["VLLM_NIXL_SIDE_CHANNEL_HOST"] = cfg.nixl.side_channel_host
            env.setdefault("VLLM_HOST_IP", cfg.nixl.side_channel_host)
        if self.role != "aggregated":
            host = env.get("VLLM_NIXL_SIDE_CHANNEL_HOST", "0.0.0.0")
            env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(free_port(host))
        if self.cores:
            env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in sorted(self.cores))
        env.update(phase.env)

    async def generate(self, kind: str, request: Any) -> AsyncIterator[Head | str]:
        async for item in self.host.generate(kind, request):
            yield item

    async def generate_once(self, kind: str, request: Any) -> Head:
        return await self.host.generate_once(kind, request)

    async def models(self) -> dict[str, Any]:
        return await self.host.models()

    async def stats(self) -> dict[str, Any]:
        """Engine counters plus where its processes may run (for checks and debugging)."""
        pids = engine_pids()
        return {**self.host.stats(), "role": self.role, "affinity": describe_affinity(pids)}

    async def check_health(self) -> None:
        await self.host.check_health()

    def __del__(self):
        host = getattr(self, "host", None)
        if host is not None:
            host.shutdown()


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
        self._init_front(
            self.cfg,
            LocalEngineClient(self.host),
            HandleEngineClient(prefill) if prefill is not None else None,
        )


@serve.deployment
class PrefillServer(EngineServer):
    role = "prefill"


@serve.deployment
@serve.ingress()
class DecodeServer(EngineFront):
    role = "decode"


@serve.deployment
@serve.ingress()
class AggregatedServer(EngineFront):
    role = "aggregated"

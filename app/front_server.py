"""The HTTP front as its own deployment (``front.mode: separate``).

The default front lives in each decode replica, so a stream dies with that replica's
process. This one holds the client's connection in a process without an engine and reaches
decode replicas over handles: when a decode replica dies, process and all, its streams
continue on another one from the tokens the client has (``RemoteDecodeClient`` and the
migrator), like Dynamo's frontend. The price is one handle hop per request and the chunks'
way from decode to the front (docs/BENCHMARKS.md, bench/serving_overhead.py).
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from app.config import AppConfig
from app.deployments import replica_id
from app.engine_clients import HandleEngineClient, RemoteDecodeClient, prefill_client
from app.ingress import OpenAIFront


@serve.deployment(name="FrontServer")
@serve.ingress()
class FrontServer(OpenAIFront):
    async def __init__(self, config: dict[str, Any], engines: DeploymentHandle,
                       prefill: DeploymentHandle | None = None):
        """``engines``: the decode deployment (the aggregated one in aggregated mode)."""
        cfg = AppConfig.model_validate(config)
        transport = cfg.handoff.handle_transport
        info = await engines.engine_info.remote()  # waits for an engine replica to be up
        decode = HandleEngineClient(engines, transport)
        self._init_front(
            cfg,
            RemoteDecodeClient(decode),
            prefill_client(prefill, cfg) if prefill is not None else None,
            peer=decode.stream if cfg.server.max_migrations > 0 else None,
            block_size=info["block_size"],
            max_model_len=info["max_model_len"],
        )

    async def stats(self) -> dict[str, Any]:
        """Hand-overs and token-1 sources seen by this front (for checks and debugging)."""
        return {"role": "front", "replica": replica_id(), **self.flow_stats()}

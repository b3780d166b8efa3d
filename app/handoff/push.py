"""Push transfers with early decode admission (``handoff.transfer: push``).

With pull (vLLM's NixlConnector) the decode leg can only start once prefill has answered
with its block ids, so prefill's reply, decode's admission and the READ all sit between
prefill's last layer and decode's first step (docs/HANDOFF.md). With push (vLLM's
NixlPushConnector) the front sends both legs at once under one request id: decode admits
the request and allocates its blocks while prefill computes, registers them with the
prefill worker, and the prefill worker WRITEs the KV the moment the request finishes. The
front must name the prefill engine in the decode leg, so it picks the prefill replica itself
(the prefill plane's pool) from the NIXL coordinates each prefill replica publishes.

Decode samples token 1 itself (its request is fixed before prefill's token 1 exists), so the
first-token fast path (app/handoff/first_token.py) does not apply. Nothing here imports Ray
or vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# vLLM's serving layer prefixes the client-level request id per endpoint; the prefill engine
# knows the request under that id (the decode leg's heartbeats name it).
_ID_PREFIX = {"completion": "cmpl", "chat": "chatcmpl"}


@dataclass(frozen=True)
class PushTarget:
    """A prefill replica as the decode engine's connector must name it."""

    replica: str  # the replica id the prefill plane's pool and the KV router use
    engine_id: str
    host: str
    port: int
    tp_size: int

    @staticmethod
    def advertised(engine_id: str, host: str, port: int, tp_size: int) -> dict[str, Any]:
        """What a prefill replica publishes (in its prefill-plane endpoint, key ``push``)."""
        return {"engine_id": engine_id, "host": host, "port": int(port),
                "tp_size": int(tp_size)}

    @classmethod
    def from_endpoint(cls, replica: str, endpoint: dict[str, Any]) -> PushTarget | None:
        """None if the replica does not take pushed requests (no or malformed coordinates)."""
        push = endpoint.get("push")
        if not isinstance(push, dict):
            return None
        try:
            return cls(replica, str(push["engine_id"]), str(push["host"]), int(push["port"]),
                       int(push["tp_size"]))
        except (KeyError, TypeError, ValueError):
            return None


def decode_push_params(target: PushTarget, kind: str, request_id: str) -> dict[str, Any]:
    """The decode leg's ``kv_transfer_params``: wait for ``target`` to push the prompt's KV.

    The push connector matches the two legs by request id (vLLM strips its own random
    suffix on both sides), so both legs carry ``request_id``."""
    return {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_engine_id": target.engine_id,
        "remote_host": target.host,
        "remote_port": target.port,
        "tp_size": target.tp_size,
        "remote_request_id": f"{_ID_PREFIX.get(kind, 'cmpl')}-{request_id}",
    }


def is_pushed_leg(params: dict[str, Any] | None) -> bool:
    """Whether a decode leg's ``kv_transfer_params`` await a push: a pulled leg names the
    prefill blocks to READ (prefill's answer gave them), a pushed one cannot yet."""
    return bool(params and params.get("do_remote_prefill") and "remote_block_ids" not in params)

"""Ray Serve request routers for the two engine pools (thin: the decisions live elsewhere).

* They publish the live replica set of their deployment to a per-process registry. In the
  ingress router's process that is how :class:`app.routing.router.KVRouter` learns which
  replicas exist, where their KV events are, and when one leaves, from Ray's own
  long-poll, with no polling of ours.
* :class:`PrefillPoolRouter` also honours the router's choice: the decode replica calls the
  prefill handle with ``prefill_replica=<full replica id>`` and the call goes there, unless
  that replica is gone or full, then power-of-two as before.
"""

from __future__ import annotations

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, RunningReplica

PREFILL_HINT_KWARG = "prefill_replica"
EXCLUDE_KWARG = "exclude_replica"  # a migration must not land on the replica it leaves



def _publish(deployment: str, replicas: list[RunningReplica]) -> None:
    # Imported here, not at module level: Ray pickles request-router classes *by value*, so
    # module globals would be private copies; the registry module is the process's own.
    from app.routing import replica_registry

    replica_registry.publish(deployment, {
        r.replica_id.to_full_id_str(): dict(r.replica_metadata or {}) for r in replicas})


class DecodePoolRouter(PowerOfTwoChoicesRequestRouter):
    """Power-of-two for Ray's own picks (fallback proxy, migrations); publishes the replica
    set; never picks the replica named by ``exclude_replica`` while another exists."""

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        _publish(self._deployment_id.name, replicas)

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        excluded = pending_request.kwargs.get(EXCLUDE_KWARG) if pending_request else None
        if excluded:
            others = [r for r in candidate_replicas
                      if r.replica_id.to_full_id_str() != excluded]
            candidate_replicas = others or candidate_replicas
        return await super().choose_replicas(candidate_replicas, pending_request)


class PrefillPoolRouter(DecodePoolRouter):
    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        hint = pending_request.kwargs.get(PREFILL_HINT_KWARG) if pending_request else None
        if hint:
            for replica in self._replicas.values():
                if replica.replica_id.to_full_id_str() == hint:
                    # Ranked: the chosen one first; if it is full, any replica.
                    return [[replica], list(self._replicas.values())]
        return await super().choose_replicas(candidate_replicas, pending_request)

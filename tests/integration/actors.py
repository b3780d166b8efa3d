"""Serve replica actors as the GCS knows them (test clusters run without the dashboard, which
``ray.util.state`` needs)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReplicaActor:
    replica_id: str  # the actor name: serve's ReplicaID.to_full_id_str()
    node_id: str
    pid: int


def alive_replicas(app: str, deployment: str) -> list[ReplicaActor]:
    from ray._private.state import actors

    cls = f"ServeReplica:{app}:{deployment}"
    return [ReplicaActor(a["Name"], a["Address"]["NodeID"],
                         int(a["Pid"]))
            for a in actors().values()
            if a["ActorClassName"] == cls and a["State"] == "ALIVE"]

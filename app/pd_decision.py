"""Which path a request takes: remote prefill + decode, or one engine doing both.

Pure logic (no Ray, no vLLM) so every branch is unit-tested in microseconds. Later routing
work (KV-aware, short-prompt threshold) extends :func:`decide_route` with more inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Route(StrEnum):
    DISAGGREGATED = "disaggregated"  # prefill engine computes KV, decode engine pulls it
    AGGREGATED = "aggregated"  # one engine does both phases by design
    FALLBACK = "fallback"  # meant to disaggregate, but prefill failed: decode prefilled
    # The KV router chose prefill on the decode replica (app.routing.policy.PrefillPlan):
    LOCAL_PREFILL_CACHED = "local-prefill:cached"
    LOCAL_PREFILL_SHORT = "local-prefill:short"
    LOCAL_PREFILL_BUSY = "local-prefill:busy"


@dataclass(frozen=True)
class RequestShape:
    """The few request features the decision needs."""

    n: int = 1
    use_beam_search: bool = False


def decide_route(mode: str, shape: RequestShape, prefill_available: bool = True,
                 router_plan: str | None = None) -> Route:
    """``router_plan``: the KV router's ``PrefillPlan`` value, when it chose one."""
    if mode == "aggregated":
        return Route.AGGREGATED
    # One prefill hands off one sequence's blocks; n>1 and beam search fork sequences on the
    # decode side, which vLLM's NIXL handoff does not support, so they run on one engine.
    if shape.n > 1 or shape.use_beam_search:
        return Route.AGGREGATED
    if router_plan is not None and router_plan != Route.DISAGGREGATED.value:
        return Route(router_plan)
    if not prefill_available:
        return Route.FALLBACK
    return Route.DISAGGREGATED


def fallback_on_prefill_status(status: int) -> bool:
    """Prefill answered with an error: 4xx is the client's fault and goes back to it; anything
    else is the prefill side's fault and decode prefills locally (llm-d does the same)."""
    return not 400 <= status < 500

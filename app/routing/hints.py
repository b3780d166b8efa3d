"""The router's choices as they travel to the decode replica: ``x-serve-router-*`` headers.

HAProxy strips client-sent ``x-serve-router-*`` headers before asking the router, so behind it
these can be trusted. Pure (no Ray, no vLLM): the orchestrator imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.routing.policy import PrefillPlan

HEADER_PLAN = "x-serve-router-plan"
HEADER_PREFILL = "x-serve-router-prefill-replica"
HEADER_PROMPT_TOKENS = "x-serve-router-prompt-tokens"
HEADER_CACHED_TOKENS = "x-serve-router-cached-tokens"  # predicted, on the prefilling replica
# "<in>,<out>": the router's time.monotonic() on receiving the route call and on answering,
# set only with handoff.timeline on (one host, one clock: the front's timeline places them).
HEADER_MARKS = "x-serve-router-marks"


@dataclass(frozen=True)
class RouteHint:
    """The router's choices as the decode replica receives them."""

    plan: PrefillPlan | None = None
    prefill_replica: str | None = None
    prompt_tokens: int = 0
    predicted_cached_tokens: int = 0
    router_marks: tuple[float, float] | None = None  # (in, out), see HEADER_MARKS

    @property
    def local_prefill(self) -> bool:
        return self.plan is not None and self.plan is not PrefillPlan.REMOTE


def read_route_hint(headers: Any) -> RouteHint:
    """Parse the router's headers; absent or malformed ones mean "no hint"."""
    plan_value = headers.get(HEADER_PLAN)
    try:
        plan = PrefillPlan(plan_value) if plan_value else None
        prompt_tokens = int(headers.get(HEADER_PROMPT_TOKENS) or 0)
        cached = int(headers.get(HEADER_CACHED_TOKENS) or 0)
    except ValueError:
        return RouteHint()
    return RouteHint(plan, headers.get(HEADER_PREFILL) or None, prompt_tokens, cached,
                     _marks(headers.get(HEADER_MARKS)))


def marks_header(received: float, answered: float) -> str:
    return f"{received:.6f},{answered:.6f}"


def _marks(value: str | None) -> tuple[float, float] | None:
    try:
        received, answered = (float(v) for v in (value or "").split(","))
    except ValueError:
        return None
    return received, answered

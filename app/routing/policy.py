"""Where a request goes: the decode replica, local or remote prefill, the prefill replica.

Pure functions over plain numbers (no Ray, no vLLM), so every branch is unit-tested by hand.
Units are KV blocks, as in Dynamo's KV router: a block of prompt to prefill and a block of KV
held by a running sequence are the two resources a replica spends.

Decode replica cost (lowest wins)::

    prefill_weight * (queued_prefill_blocks + uncached_prompt_blocks)
      + decode_weight * active_kv_blocks
      + kv_usage_weight * kv_usage * prompt_blocks

The first term is the prefill work the replica would do if it prefilled locally (queued work
plus this prompt's part it does not hold); the second is the decode work already running on
it; the third pushes away from replicas whose KV cache is nearly full (a full cache preempts).
Ties go to the lower load, then to a random pick (the caller shuffles candidates).

Conditional disaggregation: prefill on the decode replica itself when what it would compute is
small (below ``local_prefill_max_tokens``: a remote prefill's fixed handoff cost outweighs the
compute it saves) and no prefill replica holds more of the prompt, or when every prefill
replica is saturated and the decode replica has slack. Otherwise prefill remotely on the
replica with the most cached blocks, penalised by its queued prefill tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum


class PrefillPlan(StrEnum):
    """The ``x-pd-route`` values the router can choose (``fallback`` is decided later)."""

    REMOTE = "disaggregated"
    LOCAL_CACHED = "local-prefill:cached"  # decode already holds most of the prompt
    LOCAL_SHORT = "local-prefill:short"  # the prompt itself is short
    LOCAL_BUSY = "local-prefill:busy"  # prefill pool saturated, decode has slack


@dataclass(frozen=True)
class RoutingWeights:
    prefill_weight: float = 1.0
    decode_weight: float = 1.0
    kv_usage_weight: float = 1.0
    prefill_queue_weight: float = 1.0
    local_prefill_max_tokens: int = 256
    prefill_saturated_tokens: int = 8192
    decode_slack_tokens: int = 2048


@dataclass(frozen=True)
class ReplicaLoad:
    """What the router knows of one replica's load: its last report plus what it booked since."""

    queued_prefill_tokens: int = 0  # prompt tokens accepted but not yet prefilled
    active_kv_blocks: int = 0  # KV blocks held by running sequences
    kv_usage: float = 0.0  # fraction of the KV cache in use
    running: int = 0  # requests in flight (HTTP front or engine)


@dataclass(frozen=True)
class Candidate:
    replica: str
    cached_blocks: int
    load: ReplicaLoad


@dataclass(frozen=True)
class Scored:
    replica: str
    cost: float
    cached_blocks: int
    load: ReplicaLoad


@dataclass(frozen=True)
class Decision:
    decode: Scored
    plan: PrefillPlan
    prefill: Scored | None  # None unless plan is REMOTE


def blocks(tokens: int, block_size: int) -> int:
    return math.ceil(tokens / block_size) if tokens > 0 else 0


def decode_cost(c: Candidate, prompt_blocks: int, block_size: int, w: RoutingWeights) -> float:
    uncached = max(prompt_blocks - c.cached_blocks, 0)
    queued = blocks(c.load.queued_prefill_tokens, block_size)
    return (
        w.prefill_weight * (queued + uncached)
        + w.decode_weight * c.load.active_kv_blocks
        + w.kv_usage_weight * c.load.kv_usage * prompt_blocks
    )


def prefill_cost(c: Candidate, prompt_blocks: int, block_size: int, w: RoutingWeights) -> float:
    uncached = max(prompt_blocks - c.cached_blocks, 0)
    return uncached + w.prefill_queue_weight * blocks(c.load.queued_prefill_tokens, block_size)


def _best(scored: list[Scored]) -> Scored:
    # min() keeps the first of equal keys: callers shuffle, so exact ties are random.
    return min(scored, key=lambda s: (s.cost, s.load.running, s.load.queued_prefill_tokens))


def choose_decode(candidates: Sequence[Candidate], prompt_blocks: int, block_size: int,
                  w: RoutingWeights) -> Scored:
    if not candidates:
        raise ValueError("no decode replica to choose from")
    return _best([Scored(c.replica, decode_cost(c, prompt_blocks, block_size, w),
                         c.cached_blocks, c.load) for c in candidates])


def choose_prefill(candidates: Sequence[Candidate], prompt_blocks: int, block_size: int,
                   w: RoutingWeights) -> Scored | None:
    if not candidates:
        return None
    return _best([Scored(c.replica, prefill_cost(c, prompt_blocks, block_size, w),
                         c.cached_blocks, c.load) for c in candidates])


def plan_prefill(prompt_tokens: int, decode: Scored, prefill_pool: Sequence[Candidate],
                 block_size: int, w: RoutingWeights) -> PrefillPlan:
    """Local or remote prefill for a request already placed on ``decode``."""
    cached_tokens = min(decode.cached_blocks * block_size, prompt_tokens)
    uncached = prompt_tokens - cached_tokens
    if not prefill_pool:
        return PrefillPlan.LOCAL_BUSY
    best_prefill_cached = max(c.cached_blocks for c in prefill_pool) * block_size
    # A prefill replica holding more of the prompt than decode (by over a block) would compute
    # less: keep its cache hit rather than recompute the prefix on decode.
    prefill_holds_more = best_prefill_cached > cached_tokens + block_size
    if uncached < w.local_prefill_max_tokens and not prefill_holds_more:
        # Nothing worth shipping: say why, so operators tell cache wins from short prompts.
        if prompt_tokens < w.local_prefill_max_tokens:
            return PrefillPlan.LOCAL_SHORT
        return PrefillPlan.LOCAL_CACHED
    least_queued = min(c.load.queued_prefill_tokens for c in prefill_pool)
    decode_work = decode.load.queued_prefill_tokens + uncached
    if least_queued >= w.prefill_saturated_tokens and decode_work <= w.decode_slack_tokens:
        return PrefillPlan.LOCAL_BUSY
    return PrefillPlan.REMOTE


def decide(prompt_tokens: int, block_size: int, decode_pool: Sequence[Candidate],
           prefill_pool: Sequence[Candidate], w: RoutingWeights) -> Decision:
    """The whole routing decision for one request (candidates in random order)."""
    prompt_blocks = prompt_tokens // block_size  # only full blocks are ever cached
    decode = choose_decode(decode_pool, prompt_blocks, block_size, w)
    plan = plan_prefill(prompt_tokens, decode, prefill_pool, block_size, w)
    prefill = (choose_prefill(prefill_pool, prompt_blocks, block_size, w)
               if plan is PrefillPlan.REMOTE else None)
    if plan is PrefillPlan.REMOTE and prefill is None:
        plan = PrefillPlan.LOCAL_BUSY
    return Decision(decode, plan, prefill)

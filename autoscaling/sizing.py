"""How many replicas each phase needs for its SLO, from its signals and the capacity profile.

Feed-forward (Dynamo's planner idea: demand / per-replica capacity at the SLO) plus one
feedback term: an observed SLO breach while work queues asks for at least one more replica,
because a profile measured on an idle machine is optimistic under interference.
"""

from __future__ import annotations

from dataclasses import dataclass

from autoscaling.profile_model import Profile


@dataclass(frozen=True)
class PrefillSignals:
    """Summed over the prefill pool (or the aggregated pool)."""

    queued_tokens: float = 0.0  # prompt tokens accepted, not yet prefilled (after cache hits)
    arrival_tokens_per_s: float = 0.0  # uncached prompt tokens arriving per second
    mean_prompt_tokens: float = 0.0  # uncached tokens of a typical prompt
    ttft_p90_ms: float | None = None  # observed on the engines; None = no recent request


@dataclass(frozen=True)
class DecodeSignals:
    """Summed over the decode pool."""

    sequences: float = 0.0  # running + waiting sequences
    generation_tokens_per_s: float = 0.0  # tokens the pool generates per second
    mean_context_tokens: float = 0.0  # prompt + generated tokens of a running sequence
    kv_usage: float = 0.0  # mean KV-cache fill of the replicas, 0..1
    itl_p90_ms: float | None = None


@dataclass(frozen=True)
class Demand:
    replicas: float  # fractional: the coordinator rounds with hysteresis
    reason: str


def prefill_demand(sig: PrefillSignals, profile: Profile, ttft_slo_ms: float,
                   target_utilization: float, current: int) -> Demand:
    """Replicas so that queued + arriving prompt tokens are prefilled within the TTFT SLO.

    A prompt's TTFT is its wait plus its own prefill plus the KV hand-off; the wait budget is
    what the SLO leaves after the latter two (at least a quarter of the SLO, so a profile with
    a slow mean prompt still scales instead of giving up).
    """
    own_ms = profile.prefill_ms(sig.mean_prompt_tokens) + profile.transfer_ms(
        sig.mean_prompt_tokens)
    wait_s = max(ttft_slo_ms - own_ms, 0.25 * ttft_slo_ms) / 1e3
    capacity = profile.prefill_tokens_per_s
    needed = (sig.arrival_tokens_per_s / target_utilization + sig.queued_tokens / wait_s)
    replicas = needed / capacity
    reason = (f"{sig.arrival_tokens_per_s:.0f} tok/s arriving + {sig.queued_tokens:.0f} queued "
              f"vs {capacity:.0f} tok/s per replica")
    if (sig.ttft_p90_ms is not None and sig.ttft_p90_ms > ttft_slo_ms
            and sig.queued_tokens > 0 and replicas <= current):
        return Demand(current + 1, f"TTFT p90 {sig.ttft_p90_ms:.0f} ms > SLO with tokens queued")
    return Demand(replicas, reason)


def decode_rate_per_replica(profile: Profile, context: float, itl_slo_ms: float,
                            kv_target_usage: float) -> tuple[int, float]:
    """(batch, generated tokens/s) one replica sustains at ``context`` within the ITL SLO and
    its planned KV fill."""
    kv_batch = profile.kv.capacity_tokens * kv_target_usage / max(context, 1.0)
    batch = max(min(profile.max_decode_batch(context, itl_slo_ms), int(kv_batch)), 1)
    return batch, batch * 1e3 / profile.itl_ms(batch, context)


def decode_demand(sig: DecodeSignals, profile: Profile, itl_slo_ms: float,
                  kv_target_usage: float, current: int) -> Demand:
    """Replicas so that the generated tokens fit the ITL SLO and the KV capacity.

    Sized on the token *rate*, not on the running-sequence count: that count is rate x output
    x ITL (Little's law) and grows when a replica is removed, which made decode flap between
    sizes (measured in the simulator). KV is sized on what the engines hold, the only signal
    that sees long contexts before they preempt.
    """
    context = max(sig.mean_context_tokens, 1.0)
    batch, rate = decode_rate_per_replica(profile, context, itl_slo_ms, kv_target_usage)
    by_rate = sig.generation_tokens_per_s / rate
    by_kv_model = sig.sequences * context / (profile.kv.capacity_tokens * kv_target_usage)
    by_kv_seen = current * sig.kv_usage / kv_target_usage  # what the engines report
    replicas = max(by_rate, by_kv_model, by_kv_seen)
    reason = (f"{sig.generation_tokens_per_s:.0f} tok/s at {context:.0f} ctx vs {rate:.0f} "
              f"tok/s per replica (batch {batch}); KV {max(by_kv_model, by_kv_seen):.2f} "
              "replicas")
    if (sig.itl_p90_ms is not None and sig.itl_p90_ms > itl_slo_ms
            and sig.sequences > current and replicas <= current):
        return Demand(current + 1, f"ITL p90 {sig.itl_p90_ms:.0f} ms > SLO with "
                      f"{sig.sequences:.0f} sequences")
    return Demand(replicas, reason)

"""The routing cost, the P/D decision and the prefill choice on hand-computed cases."""

import pytest

from app.routing.policy import (
    Candidate,
    PrefillPlan,
    ReplicaLoad,
    RoutingWeights,
    choose_decode,
    choose_prefill,
    decide,
    decode_cost,
    plan_prefill,
    prefill_cost,
)

BS = 32
W = RoutingWeights()  # all weights 1, local prefill under 256 tokens


def test_decode_cost_by_hand():
    # 10-block prompt, 4 cached; 64 queued prefill tokens (2 blocks); 5 active blocks; 50% KV.
    c = Candidate("d0", 4, ReplicaLoad(queued_prefill_tokens=64, active_kv_blocks=5,
                                       kv_usage=0.5))
    assert decode_cost(c, 10, BS, W) == (2 + 6) + 5 + 0.5 * 10
    w = RoutingWeights(prefill_weight=2.0, decode_weight=0.5, kv_usage_weight=0.0)
    assert decode_cost(c, 10, BS, w) == 2 * 8 + 0.5 * 5


def test_prefill_cost_by_hand():
    c = Candidate("p0", 3, ReplicaLoad(queued_prefill_tokens=100))  # 4 blocks queued
    assert prefill_cost(c, 10, BS, W) == 7 + 4
    assert prefill_cost(c, 10, BS, RoutingWeights(prefill_queue_weight=0.5)) == 7 + 2


def test_decode_prefers_the_cache_holder_until_its_load_outweighs_it():
    holder = Candidate("holder", 8, ReplicaLoad(active_kv_blocks=3))
    empty = Candidate("empty", 0, ReplicaLoad())
    assert choose_decode([empty, holder], 10, BS, W).replica == "holder"  # 2+3 < 10
    busy = Candidate("holder", 8, ReplicaLoad(active_kv_blocks=9))
    assert choose_decode([empty, busy], 10, BS, W).replica == "empty"  # 2+9 > 10


def test_ties_break_on_running_then_input_order():
    a = Candidate("a", 0, ReplicaLoad(running=2))
    b = Candidate("b", 0, ReplicaLoad(running=1))
    assert choose_decode([a, b], 4, BS, W).replica == "b"
    c = Candidate("c", 0, ReplicaLoad(running=1))
    assert choose_decode([c, b], 4, BS, W).replica == "c"  # caller shuffles for randomness


def test_no_decode_replica_is_an_error():
    with pytest.raises(ValueError):
        choose_decode([], 4, BS, W)
    assert choose_prefill([], 4, BS, W) is None


def test_prefill_choice_most_cached_penalised_by_queue():
    cached = Candidate("cached", 8, ReplicaLoad(queued_prefill_tokens=0))
    idle = Candidate("idle", 0, ReplicaLoad())
    assert choose_prefill([idle, cached], 10, BS, W).replica == "cached"  # 2 < 10
    swamped = Candidate("cached", 8, ReplicaLoad(queued_prefill_tokens=32 * 9))
    assert choose_prefill([idle, swamped], 10, BS, W).replica == "idle"  # 2+9 > 10


def _scored(cached_blocks, queued=0):
    return choose_decode([Candidate("d", cached_blocks, ReplicaLoad(
        queued_prefill_tokens=queued))], 100, BS, W)


def test_short_prompt_prefills_locally():
    assert plan_prefill(100, _scored(0), [Candidate("p", 0, ReplicaLoad())], BS, W) \
        is PrefillPlan.LOCAL_SHORT


def test_mostly_cached_prompt_prefills_locally():
    # 1000 tokens, 28 blocks (896) cached: 104 to compute < 256.
    assert plan_prefill(1000, _scored(28), [Candidate("p", 0, ReplicaLoad())], BS, W) \
        is PrefillPlan.LOCAL_CACHED


def test_long_uncached_prompt_goes_remote():
    assert plan_prefill(1000, _scored(2), [Candidate("p", 0, ReplicaLoad())], BS, W) \
        is PrefillPlan.REMOTE


def test_saturated_prefill_pool_with_decode_slack_prefills_locally():
    busy = [Candidate("p0", 0, ReplicaLoad(queued_prefill_tokens=9000)),
            Candidate("p1", 0, ReplicaLoad(queued_prefill_tokens=8192))]
    assert plan_prefill(1000, _scored(0), busy, BS, W) is PrefillPlan.LOCAL_BUSY
    # ... but not when the decode replica has no slack either (1000 + 1500 > 2048).
    assert plan_prefill(1000, _scored(0, queued=1500), busy, BS, W) is PrefillPlan.REMOTE
    # ... and not when one prefill replica is below saturation.
    some_free = [busy[0], Candidate("p1", 0, ReplicaLoad(queued_prefill_tokens=100))]
    assert plan_prefill(1000, _scored(0), some_free, BS, W) is PrefillPlan.REMOTE


def test_empty_prefill_pool_prefills_locally():
    assert plan_prefill(1000, _scored(0), [], BS, W) is PrefillPlan.LOCAL_BUSY


def test_threshold_zero_never_prefills_locally_unless_forced():
    w = RoutingWeights(local_prefill_max_tokens=0)
    assert plan_prefill(10, _scored(0), [Candidate("p", 0, ReplicaLoad())], BS, w) \
        is PrefillPlan.REMOTE


def test_decide_end_to_end():
    decode = [Candidate("d0", 0, ReplicaLoad()), Candidate("d1", 20, ReplicaLoad())]
    prefill = [Candidate("p0", 0, ReplicaLoad()), Candidate("p1", 25, ReplicaLoad())]
    d = decide(1000, BS, decode, prefill, W)  # 31 full blocks
    assert d.decode.replica == "d1" and d.plan is PrefillPlan.REMOTE
    assert d.prefill.replica == "p1"
    d = decide(1000, BS, [Candidate("d1", 31, ReplicaLoad())], prefill, W)
    assert d.plan is PrefillPlan.LOCAL_CACHED and d.prefill is None


def test_a_prefill_replica_holding_more_of_a_short_prompt_keeps_it_remote():
    # 200 tokens (6 full blocks), decode holds none, a prefill replica holds 5 blocks.
    holder = [Candidate("p", 5, ReplicaLoad())]
    assert plan_prefill(200, _scored(0), holder, BS, W) is PrefillPlan.REMOTE
    # One block more on prefill is not worth a handoff.
    assert plan_prefill(200, _scored(4), holder, BS, W) is PrefillPlan.LOCAL_SHORT

"""KVIndex: hand cases for each rule, then random event streams against a brute-force model."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from app.routing.kv_index import (
    AllBlocksCleared,
    ApplyResult,
    ApplyStatus,
    BlocksRemoved,
    BlocksStored,
    KVEvent,
    KVIndex,
)

TTL = 1.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def stored(*hashes: int) -> BlocksStored:
    return BlocksStored(tuple(hashes))


def removed(*hashes: int) -> BlocksRemoved:
    return BlocksRemoved(tuple(hashes))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def index(clock: FakeClock) -> KVIndex:
    idx = KVIndex(predicted_ttl_s=TTL, clock=clock)
    for name in ("a", "b", "c"):
        idx.add_replica(name)
    return idx


# -- hand cases ------------------------------------------------------------------------------


def test_leading_run_stops_at_first_hole(index: KVIndex) -> None:
    index.apply_batch("a", 0, [stored(1, 2, 3, 4, 5)])
    index.apply_batch("b", 0, [stored(1, 2, 4, 5)])  # 3 missing: 4 and 5 are unusable
    index.apply_batch("a", 1, [removed(2)])
    assert index.overlaps([1, 2, 3, 4, 5]) == {"a": 1, "b": 2, "c": 0}
    assert index.overlaps([1, 4, 5]) == {"a": 3, "b": 3, "c": 0}
    assert index.overlaps([9, 1]) == {"a": 0, "b": 0, "c": 0}
    assert index.overlaps([]) == {"a": 0, "b": 0, "c": 0}


def test_long_chain_with_holes_is_exact(index: KVIndex) -> None:
    chain = [random.Random(7).getrandbits(64) + i for i in range(2048)]
    index.apply_batch("a", 0, [BlocksStored(tuple(chain))])
    index.apply_batch("b", 0, [BlocksStored(tuple(chain[:1500]))])
    index.apply_batch("c", 0, [BlocksStored(tuple(chain)), removed(chain[700], chain[1900])])
    assert index.overlaps(chain) == {"a": 2048, "b": 1500, "c": 700}
    assert index.overlaps(tuple(chain[:10])) == {"a": 10, "b": 10, "c": 10}
    assert index.overlaps(iter(chain)) == {"a": 2048, "b": 1500, "c": 700}


def test_overlaps_for_chosen_replicas(index: KVIndex) -> None:
    index.apply_batch("a", 0, [stored(1, 2)])
    assert index.overlaps([1, 2], replicas=["a", "nope"]) == {"a": 2, "nope": 0}
    assert index.overlaps([1, 2], replicas=iter(["c"])) == {"c": 0}
    assert index.overlaps([1, 2], replicas=[]) == {}


def test_store_is_idempotent_and_removal_of_absent_is_noop(index: KVIndex) -> None:
    index.apply_batch("a", 0, [stored(1, 2), stored(2, 1), removed(7), removed(1), stored(1)])
    assert index.num_blocks("a") == 2
    assert index.overlaps([1, 2]) == {"a": 2, "b": 0, "c": 0}
    index.apply_batch("a", 1, [removed(1), removed(1)])
    assert index.num_blocks("a") == 1
    assert index.overlaps([2]) == {"a": 1, "b": 0, "c": 0}


def test_all_blocks_cleared_only_affects_its_replica(index: KVIndex) -> None:
    index.apply_batch("a", 0, [stored(1, 2)])
    index.apply_batch("b", 0, [stored(1, 2)])
    index.apply_batch("a", 1, [AllBlocksCleared(), stored(5)])
    assert index.num_blocks("a") == 1
    assert index.overlaps([1, 2]) == {"a": 0, "b": 2, "c": 0}
    assert index.overlaps([5]) == {"a": 1, "b": 0, "c": 0}


def test_first_batch_takes_any_seq_then_duplicates_are_ignored(index: KVIndex) -> None:
    assert index.apply_batch("a", 41, [stored(1)]) == ApplyResult(ApplyStatus.APPLIED)
    assert index.apply_batch("a", 41, [stored(2)]).status is ApplyStatus.DUPLICATE
    assert index.apply_batch("a", 3, [stored(2)]).status is ApplyStatus.DUPLICATE
    assert index.overlaps([1, 2])["a"] == 1
    assert index.apply_batch("a", 42, [stored(2)]).status is ApplyStatus.APPLIED
    assert index.overlaps([1, 2])["a"] == 2


def test_gap_is_refused_and_leaves_the_replica_unchanged(index: KVIndex) -> None:
    index.apply_batch("a", 10, [stored(1)])
    result = index.apply_batch("a", 13, [removed(1), stored(2)])
    assert result == ApplyResult(ApplyStatus.GAP, expected_seq=11)
    assert index.overlaps([1])["a"] == 1 and index.overlaps([2])["a"] == 0
    # The caller replays from expected_seq; the gapped batch is then accepted in turn.
    assert index.apply_batch("a", 11, [stored(3)]).status is ApplyStatus.APPLIED
    assert index.apply_batch("a", 12, []).status is ApplyStatus.APPLIED
    assert index.apply_batch("a", 13, [removed(1), stored(2)]).status is ApplyStatus.APPLIED
    assert index.overlaps([2, 3]) == {"a": 2, "b": 0, "c": 0}
    assert index.stats()["gaps"] == 1


def test_reset_forgets_blocks_and_seq_but_keeps_the_replica(
    index: KVIndex, clock: FakeClock
) -> None:
    index.apply_batch("a", 10, [stored(1, 2)])
    index.predict("a", [3])
    index.reset_replica("a")
    assert index.replicas() == ["a", "b", "c"]
    assert index.num_blocks("a") == 0
    assert index.overlaps([1, 2]) == {"a": 0, "b": 0, "c": 0}
    assert index.overlaps([3])["a"] == 0
    assert index.apply_batch("a", 0, [stored(7)]).status is ApplyStatus.APPLIED  # restarted
    assert index.overlaps([7])["a"] == 1
    index.reset_replica("unknown")  # no-op


def test_remove_replica_forgets_everything(index: KVIndex, clock: FakeClock) -> None:
    index.apply_batch("a", 10, [stored(1, 2)])
    index.predict("a", [3])
    index.remove_replica("a")
    assert index.replicas() == ["b", "c"]
    assert index.overlaps([1, 2]) == {"b": 0, "c": 0}
    assert index.overlaps([1], replicas=["a"]) == {"a": 0}
    assert index.apply_batch("a", 11, [stored(1)]).status is ApplyStatus.UNKNOWN_REPLICA
    index.add_replica("a")
    assert index.overlaps([1, 3], replicas=["a"]) == {"a": 0}
    assert index.apply_batch("a", 5, [stored(1)]).status is ApplyStatus.APPLIED
    clock.now += 2 * TTL  # the old replica's prediction expiring must not touch the new one
    index.apply_batch("a", 6, [stored(3)])
    assert index.overlaps([1, 3], replicas=["a"]) == {"a": 2}
    index.remove_replica("a")
    index.remove_replica("a")  # idempotent


def test_add_replica_is_idempotent(index: KVIndex) -> None:
    index.apply_batch("a", 10, [stored(1)])
    index.add_replica("a")
    assert index.replicas() == ["a", "b", "c"]
    assert index.num_blocks("a") == 1
    assert index.apply_batch("a", 11, []).status is ApplyStatus.APPLIED


def test_unknown_replica_is_ignored(index: KVIndex) -> None:
    assert index.apply_batch("x", 0, [stored(1)]) == ApplyResult(ApplyStatus.UNKNOWN_REPLICA)
    index.predict("x", [1])
    assert index.num_blocks("x") == 0
    assert "x" not in index.overlaps([1])
    assert index.stats()["blocks"] == 0


def test_predictions_count_until_their_ttl(index: KVIndex, clock: FakeClock) -> None:
    index.apply_batch("a", 0, [stored(1)])
    index.predict("a", [1, 2, 3])
    index.predict("b", [1, 2])
    assert index.overlaps([1, 2, 3]) == {"a": 3, "b": 2, "c": 0}
    assert index.num_blocks("a") == 1  # predictions are not real blocks
    assert index.stats()["predicted"] == 4
    clock.now += TTL / 2
    index.predict("a", [3])  # refreshed: lives TTL from now
    clock.now += TTL / 2  # the first predictions expire exactly now
    assert index.overlaps([1, 2, 3]) == {"a": 1, "b": 0, "c": 0}
    assert index.overlaps([1, 3]) == {"a": 2, "b": 0, "c": 0}
    clock.now += TTL / 2
    assert index.overlaps([1, 3]) == {"a": 1, "b": 0, "c": 0}
    assert index.stats()["predicted"] == 0


def test_store_supersedes_a_prediction(index: KVIndex, clock: FakeClock) -> None:
    index.predict("a", [1, 2])
    index.apply_batch("a", 0, [stored(1)])
    clock.now += 2 * TTL
    assert index.overlaps([1, 2])["a"] == 1
    assert index.num_blocks("a") == 1


def test_removal_and_clear_drop_predictions(index: KVIndex) -> None:
    index.predict("a", [1, 2, 3])
    index.predict("b", [1, 2, 3])
    index.apply_batch("a", 0, [removed(2)])
    index.apply_batch("b", 0, [AllBlocksCleared()])
    assert index.overlaps([1, 2, 3]) == {"a": 1, "b": 0, "c": 0}
    assert index.num_blocks("a") == 0


def test_unknown_event_type_raises_before_applying(index: KVIndex) -> None:
    index.apply_batch("a", 0, [stored(1)])
    with pytest.raises(TypeError):
        index.apply_batch("a", 1, [removed(1), "junk"])  # type: ignore[list-item]
    assert index.overlaps([1])["a"] == 1
    assert index.apply_batch("a", 1, []).status is ApplyStatus.APPLIED


def test_events_are_frozen_and_stats_count(index: KVIndex) -> None:
    event = stored(1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.block_hashes = (2,)  # type: ignore[misc]
    assert ApplyStatus.GAP == "gap"
    index.apply_batch("a", 0, [event, removed(1), stored(2, 3)])
    index.apply_batch("a", 0, [])
    index.apply_batch("a", 5, [])
    assert index.stats() == {
        "replicas": 3,
        "blocks": 2,
        "predicted": 0,
        "batches_applied": 1,
        "events_applied": 3,
        "duplicates": 1,
        "gaps": 1,
    }


# -- brute-force model -----------------------------------------------------------------------


@dataclasses.dataclass
class ModelReplica:
    stored: set[int] = dataclasses.field(default_factory=set)
    predicted: dict[int, float] = dataclasses.field(default_factory=dict)  # hash -> expiry
    last_seq: int | None = None


class Model:
    """The spec, written as plainly as possible: held = stored | unexpired predictions."""

    def __init__(self) -> None:
        self.replicas: dict[str, ModelReplica] = {}

    def apply(self, name: str, seq: int, events: Sequence[KVEvent]) -> ApplyResult:
        rep = self.replicas.get(name)
        if rep is None:
            return ApplyResult(ApplyStatus.UNKNOWN_REPLICA)
        if rep.last_seq is not None and seq <= rep.last_seq:
            return ApplyResult(ApplyStatus.DUPLICATE)
        if rep.last_seq is not None and seq > rep.last_seq + 1:
            return ApplyResult(ApplyStatus.GAP, rep.last_seq + 1)
        for event in events:
            if isinstance(event, BlocksStored):
                rep.stored.update(event.block_hashes)
            elif isinstance(event, BlocksRemoved):
                for h in event.block_hashes:
                    rep.stored.discard(h)
                    rep.predicted.pop(h, None)
            else:
                rep.stored.clear()
                rep.predicted.clear()
        rep.last_seq = seq
        return ApplyResult(ApplyStatus.APPLIED)

    def held(self, name: str, now: float) -> set[int]:
        rep = self.replicas[name]
        return rep.stored | {h for h, expiry in rep.predicted.items() if expiry > now}

    def overlaps(self, chain: Sequence[int], names: Sequence[str], now: float) -> dict[str, int]:
        result = {}
        for name in names:
            held = self.held(name, now) if name in self.replicas else set()
            run = 0
            for h in chain:
                if h not in held:
                    break
                run += 1
            result[name] = run
        return result


NAMES = ["r0", "r1", "r2"]
# A small universe so that replicas share hashes; some are full 64-bit values.
_rng = random.Random(20240607)
UNIVERSE = list(range(6)) + [_rng.getrandbits(64) for _ in range(6)]
FIXED_QUERIES = [_rng.sample(UNIVERSE, _rng.randint(1, len(UNIVERSE))) for _ in range(6)]

hashes_st = st.lists(st.sampled_from(UNIVERSE), max_size=6)
event_st = st.one_of(
    hashes_st.map(lambda hs: BlocksStored(tuple(hs))),
    hashes_st.map(lambda hs: BlocksRemoved(tuple(hs))),
    st.just(AllBlocksCleared()),
)


class KVIndexMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.index = KVIndex(predicted_ttl_s=TTL, clock=self.clock)
        self.model = Model()
        self.step = 0

    @initialize(names=st.lists(st.sampled_from(NAMES), unique=True, min_size=1))
    def start(self, names: list[str]) -> None:
        for name in names:
            self.add(name)

    @rule(name=st.sampled_from(NAMES))
    def add(self, name: str) -> None:
        self.index.add_replica(name)
        self.model.replicas.setdefault(name, ModelReplica())

    @rule(name=st.sampled_from(NAMES))
    def remove(self, name: str) -> None:
        self.index.remove_replica(name)
        self.model.replicas.pop(name, None)

    @rule(name=st.sampled_from(NAMES))
    def reset(self, name: str) -> None:
        self.index.reset_replica(name)
        if name in self.model.replicas:
            self.model.replicas[name] = ModelReplica()

    @rule(
        name=st.sampled_from(NAMES + ["stranger"]),
        delta=st.sampled_from([1, 1, 1, 1, 0, -1, -3, 2, 5]),
        start=st.integers(-5, 1000),
        events=st.lists(event_st, max_size=4),
    )
    def apply(self, name: str, delta: int, start: int, events: list[KVEvent]) -> None:
        rep = self.model.replicas.get(name)
        last = rep.last_seq if rep is not None else None
        seq = start if last is None else last + delta
        expected = self.model.apply(name, seq, events)
        assert self.index.apply_batch(name, seq, events) == expected

    @rule(name=st.sampled_from(NAMES + ["stranger"]), chain=hashes_st)
    def predict(self, name: str, chain: list[int]) -> None:
        self.index.predict(name, chain)
        rep = self.model.replicas.get(name)
        if rep is not None:
            for h in chain:
                rep.predicted[h] = self.clock.now + TTL

    def live_predictions(self) -> dict[str, list[int]]:
        now = self.clock.now
        live = {
            name: sorted(h for h, expiry in rep.predicted.items() if expiry > now)
            for name, rep in self.model.replicas.items()
        }
        return {name: hashes for name, hashes in live.items() if hashes}

    @precondition(lambda self: bool(self.live_predictions()))
    @rule(dt=st.sampled_from([0.25, 0.5]), data=st.data())
    def predict_again(self, dt: float, data: st.DataObject) -> None:
        """Refresh predictions still live after ``dt``: a lost refresh shows only later."""
        self.advance(dt)
        live = self.live_predictions()
        if live:
            name = data.draw(st.sampled_from(sorted(live)))
            self.predict(name, data.draw(st.permutations(live[name])))

    @rule(dt=st.sampled_from([0.0, 0.25, 0.25, 0.5, TTL]))
    def advance(self, dt: float) -> None:
        self.clock.now += dt

    @rule(chain=st.lists(st.sampled_from(UNIVERSE), max_size=10))
    def query(self, chain: list[int]) -> None:
        self.check(chain)

    @precondition(lambda self: bool(self.model.replicas))
    @rule(data=st.data())
    def query_held(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.model.replicas)))
        held = sorted(self.model.held(name, self.clock.now))
        self.check(data.draw(st.permutations(held)))

    def check(self, chain: Sequence[int]) -> None:
        now = self.clock.now
        assert self.index.overlaps(chain) == self.model.overlaps(
            chain, list(self.model.replicas), now
        )
        subset = ["r2", "stranger", "r0"]
        assert self.index.overlaps(chain, subset) == self.model.overlaps(chain, subset, now)

    @invariant()
    def agrees_with_model(self) -> None:
        self.step += 1
        now = self.clock.now
        rng = random.Random(self.step)
        queries = list(FIXED_QUERIES)
        for name in self.model.replicas:
            held = sorted(self.model.held(name, now))
            shuffled = rng.sample(held, len(held))
            queries += [held, held[::-1], shuffled, shuffled[: len(held) // 2], shuffled + [0]]
        for chain in queries:
            self.check(chain)
        assert self.index.replicas() == list(self.model.replicas)
        for name in NAMES:
            expected = len(self.model.replicas[name].stored) if name in self.model.replicas else 0
            assert self.index.num_blocks(name) == expected
        stats = self.index.stats()
        assert stats["replicas"] == len(self.model.replicas)
        assert stats["blocks"] == sum(len(r.stored) for r in self.model.replicas.values())
        assert stats["predicted"] == sum(
            len(self.model.held(name, now) - rep.stored)
            for name, rep in self.model.replicas.items()
        )


KVIndexMachine.TestCase.settings = settings(
    max_examples=200, stateful_step_count=50, deadline=None, database=None
)
TestKVIndexStateful = KVIndexMachine.TestCase


@settings(max_examples=200, deadline=None, database=None)
@given(
    length=st.integers(0, 300),
    run=st.integers(0, 300),
    holes=st.lists(st.integers(0, 299), max_size=4),
    extra=st.lists(st.integers(0, 299), max_size=20),
    seed=st.integers(0, 2**32 - 1),
)
def test_long_chains_match_a_plain_loop(
    length: int, run: int, holes: list[int], extra: list[int], seed: int
) -> None:
    """Longer chains than the machine builds, so that galloping and bisection get exercised:
    a held prefix, holes in it, and stray held blocks past it."""
    rng = random.Random(seed)
    chain = [rng.getrandbits(64) for _ in range(length)]
    held = set(chain[:run]) | {chain[i] for i in extra if i < length}
    held -= {chain[i] for i in holes if i < length}
    index = KVIndex()
    index.add_replica("a")
    index.apply_batch("a", 0, [BlocksStored(tuple(held))])
    expected = 0
    while expected < length and chain[expected] in held:
        expected += 1
    assert index.overlaps(chain) == {"a": expected}

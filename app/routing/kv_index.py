"""Which KV-cache blocks each engine replica holds, so a router can send a prompt where its
prefix is already cached.

vLLM publishes KV-cache events per engine (blocks stored, blocks removed, all cleared) in
numbered batches; this index replays them. Block hashes chain (block i's hash covers the tokens
of blocks 0..i), so a prompt is a sequence of hashes ``h[0..n-1]`` and a replica can reuse
blocks 0..k-1 only if it holds every one of ``h[0..k-1]``: vLLM's prefix lookup stops at the
first miss. :meth:`KVIndex.overlaps` therefore answers, per replica, the length of the longest
leading run of the prompt's hashes that the replica holds. A hole (a middle block evicted)
cuts the run there even if later blocks are still held.

"Held" means stored (seen in a ``BlocksStored`` event and not removed since) or *predicted*:
the router just sent a prompt to the replica, whose engine will store its blocks long before
the events arrive; without predictions the next request sharing that prefix would be routed
as if nothing were cached. A prediction lasts ``predicted_ttl_s`` per hash (a newer predict
refreshes it). A removal of a hash, or ``AllBlocksCleared``, drops the replica's prediction for
it too.

Events come in per-replica batches with consecutive sequence numbers. A gap means events were
lost and the index would silently diverge from the engine, so a gapped batch is refused and the
caller replays from the expected number or resets the replica.

Implementation: per replica, one set of held hashes (stored plus predicted) and a dict of the
predicted ones with their expiry. A lookup per replica first guesses the run's end with a
galloping search of point lookups (O(log n) Python steps, exact when the replica has no hole),
then verifies the whole prefix with one C-level ``set.issuperset``; only when that finds a hole
does a bisection over ``issuperset`` of halves locate the first miss. Predictions expire lazily,
in predict order (the clock must be monotonic), at the next call that reads them. Pure Python,
no Ray/vLLM imports; not thread-safe: callers serialise access.
"""

from __future__ import annotations

import enum
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import compress, filterfalse, repeat

__all__ = [
    "AllBlocksCleared",
    "ApplyResult",
    "ApplyStatus",
    "BlocksRemoved",
    "BlocksStored",
    "KVEvent",
    "KVIndex",
]


@dataclass(frozen=True, slots=True)
class BlocksStored:
    block_hashes: tuple[int, ...]
    parent_hash: int | None = None  # informational; the index does not need the chain


@dataclass(frozen=True, slots=True)
class BlocksRemoved:
    block_hashes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    pass


KVEvent = BlocksStored | BlocksRemoved | AllBlocksCleared
_EVENT_TYPES = frozenset({BlocksStored, BlocksRemoved, AllBlocksCleared})


class ApplyStatus(enum.StrEnum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"
    GAP = "gap"
    UNKNOWN_REPLICA = "unknown_replica"


@dataclass(frozen=True, slots=True)
class ApplyResult:
    status: ApplyStatus
    expected_seq: int | None = None  # for GAP: the seq the index wanted next


_APPLIED = ApplyResult(ApplyStatus.APPLIED)
_DUPLICATE = ApplyResult(ApplyStatus.DUPLICATE)
_UNKNOWN = ApplyResult(ApplyStatus.UNKNOWN_REPLICA)


@dataclass(slots=True, eq=False)
class _Replica:
    """One replica's view. Identity matters: expiry entries point at the object, so the
    entries of a removed replica never touch a newcomer registered under the same name."""

    # stored | predicted: one set so that a lookup is a single C-level issuperset.
    held: set[int] = field(default_factory=set)
    # hash -> expiry (clock time); never a stored hash (a store supersedes the prediction).
    predicted: dict[int, float] = field(default_factory=dict)
    last_seq: int | None = None

    def forget_blocks(self) -> None:
        self.held.clear()
        self.predicted.clear()


class KVIndex:
    """Replica -> held KV blocks, fed by KV events, queried by prompt hash chains."""

    def __init__(
        self, predicted_ttl_s: float = 2.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl = predicted_ttl_s
        self._clock = clock
        self._replicas: dict[str, _Replica] = {}
        # (expiry, replica, hashes) per predict call; the clock is monotonic, so expiries are
        # sorted and expiring is a pop from the left. A hash refreshed, stored or removed since
        # is recognised by its expiry no longer matching the entry's.
        self._expiries: deque[tuple[float, _Replica, tuple[int, ...]]] = deque()
        self._counters = {"batches_applied": 0, "events_applied": 0, "duplicates": 0, "gaps": 0}

    # -- replicas ---------------------------------------------------------------------------

    def add_replica(self, replica: str) -> None:
        if replica not in self._replicas:
            self._replicas[replica] = _Replica()

    def remove_replica(self, replica: str) -> None:
        state = self._replicas.pop(replica, None)
        if state is not None:
            state.forget_blocks()

    def reset_replica(self, replica: str) -> None:
        """After a gap or a publisher restart the held set is unknown; an empty one is merely
        pessimistic until the engine's new events arrive."""
        state = self._replicas.get(replica)
        if state is not None:
            state.forget_blocks()
            state.last_seq = None

    def replicas(self) -> list[str]:
        return list(self._replicas)

    # -- events -----------------------------------------------------------------------------

    def apply_batch(self, replica: str, seq: int, events: Sequence[KVEvent]) -> ApplyResult:
        """Apply one publisher batch unless it is a replay or follows a gap (see module doc)."""
        state = self._replicas.get(replica)
        if state is None:
            return _UNKNOWN
        last = state.last_seq
        if last is not None:
            if seq <= last:
                self._counters["duplicates"] += 1
                return _DUPLICATE
            if seq != last + 1:
                self._counters["gaps"] += 1
                return ApplyResult(ApplyStatus.GAP, expected_seq=last + 1)
        # Checked up front so that a bad event cannot leave the batch half applied.
        if not _EVENT_TYPES.issuperset(map(type, events)):
            raise TypeError(f"unknown KV event type in batch {seq} of {replica!r}")
        for event in events:
            if type(event) is BlocksStored:
                _store(state, event.block_hashes)
            elif type(event) is BlocksRemoved:
                _remove(state, event.block_hashes)
            else:
                state.forget_blocks()
        state.last_seq = seq
        self._counters["batches_applied"] += 1
        self._counters["events_applied"] += len(events)
        return _APPLIED

    # -- predictions ------------------------------------------------------------------------

    def predict(self, replica: str, block_hashes: Sequence[int]) -> None:
        """Count ``block_hashes`` as held by ``replica`` for ``predicted_ttl_s``: the router
        just sent it this prompt and the engine stores the blocks before its events arrive.

        On the request path, hence bulk C-level set/dict operations rather than a loop."""
        state = self._replicas.get(replica)
        if state is None:
            return
        now = self._clock()
        self._expire(now)
        chain = block_hashes if isinstance(block_hashes, list | tuple) else tuple(block_hashes)
        held, predicted = state.held, state.predicted
        # New hashes, and predicted ones to refresh; stored ones need no prediction.
        fresh = (*filterfalse(held.__contains__, chain), *filter(predicted.__contains__, chain))
        if not fresh:
            return
        expiry = now + self._ttl
        predicted.update(dict.fromkeys(fresh, expiry))
        held.update(fresh)
        self._expiries.append((expiry, state, fresh))

    def _expire(self, now: float) -> None:
        queue = self._expiries
        while queue and queue[0][0] <= now:
            expiry, state, hashes = queue.popleft()
            _drop_predictions(state, hashes, expiry)

    # -- queries ----------------------------------------------------------------------------

    def overlaps(
        self, block_hashes: Sequence[int], replicas: Iterable[str] | None = None
    ) -> dict[str, int]:
        """Leading blocks of ``block_hashes`` held per replica (unknown names -> 0)."""
        self._expire(self._clock())
        chain = block_hashes if isinstance(block_hashes, list | tuple) else list(block_hashes)
        names = self._replicas if replicas is None else replicas
        result: dict[str, int] = {}
        for name in names:
            state = self._replicas.get(name)
            result[name] = 0 if state is None else _leading_run(state.held, chain)
        return result

    def num_blocks(self, replica: str) -> int:
        state = self._replicas.get(replica)
        return 0 if state is None else len(state.held) - len(state.predicted)

    def stats(self) -> dict[str, int]:
        self._expire(self._clock())
        states = self._replicas.values()
        predicted = sum(len(s.predicted) for s in states)
        return {
            "replicas": len(self._replicas),
            "blocks": sum(len(s.held) for s in states) - predicted,
            "predicted": predicted,
            **self._counters,
        }


def _store(state: _Replica, hashes: tuple[int, ...]) -> None:
    state.held.update(hashes)
    _unpredict(state.predicted, hashes)  # the real block supersedes the prediction


def _remove(state: _Replica, hashes: tuple[int, ...]) -> None:
    state.held.difference_update(hashes)
    _unpredict(state.predicted, hashes)


def _unpredict(predicted: dict[int, float], hashes: tuple[int, ...]) -> None:
    if predicted and not predicted.keys().isdisjoint(hashes):
        for h in hashes:
            predicted.pop(h, None)


def _drop_predictions(state: _Replica, hashes: tuple[int, ...], expiry: float) -> None:
    """Drop those of ``hashes`` still predicted with ``expiry``: not refreshed, stored or
    removed since (NaN, the default for absent ones, equals no expiry)."""
    predicted = state.predicted
    current = map(predicted.get, hashes, repeat(math.nan))
    due = tuple(compress(hashes, map(expiry.__eq__, current)))
    for h in due:
        predicted.pop(h, None)
    state.held.difference_update(due)


def _leading_run(held: set[int], chain: list[int] | tuple[int, ...]) -> int:
    """Length of the longest prefix of ``chain`` inside ``held``.

    Engines evict from the tail, so held blocks are nearly always prefix-closed: guess the end
    with O(log n) point lookups as if they were, then confirm at C speed. Holes (rare) fall
    back to an exact bisection.
    """
    n = len(chain)
    if n == 0 or chain[0] not in held:
        return 0
    guess = _galloping_end(held, chain)
    prefix = chain if guess == n else chain[:guess]
    if held.issuperset(prefix):
        return guess  # chain[guess] is not held (or guess == n): the run ends exactly here
    return _first_miss(held, chain, guess)


def _galloping_end(held: set[int], chain: list[int] | tuple[int, ...]) -> int:
    """Some k with chain[k - 1] held and chain[k] not (or k == n), found as if monotone."""
    n = len(chain)
    lo, step = 0, 1  # invariant: chain[lo] is held
    while True:
        hi = lo + step
        if hi >= n:
            hi = n
            break
        if chain[hi] not in held:
            break
        lo, step = hi, step * 2
    while hi - lo > 1:  # invariant: chain[lo] held, chain[hi] not held (or hi == n)
        mid = (lo + hi) // 2
        if chain[mid] in held:
            lo = mid
        else:
            hi = mid
    return hi


def _first_miss(held: set[int], chain: list[int] | tuple[int, ...], hi: int) -> int:
    """Index of the first hash of ``chain[:hi]`` not in ``held``; one must exist."""
    lo = 0  # invariant: chain[:lo] all held, a miss lies in chain[lo:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if held.issuperset(chain[lo:mid]):
            lo = mid
        else:
            hi = mid
    return lo

"""How fast is the router's KV-block index? Lookup latency, event throughput and memory.

The KV-aware router (issue 7) asks :class:`app.routing.kv_index.KVIndex` for every request how
many leading blocks of the prompt each replica holds, and applies every KV-cache event the
engines publish. Issue 7's targets, checked here (PASS/FAIL):

* ``overlaps`` for a 32k-token prompt, 4 replicas registered: p50 <= 200 µs, at block size 16
  (2048 hashes) and 32 (1024 hashes), (a) one replica holding the whole prompt, one half, two
  nothing, (b) nobody holding it;
* applying events: >= 100k block events/s (a ``BlocksStored`` of 1 hash = 1 block event),
  sequence checks included, 4 replicas and ~200k resident blocks.

Also reported, without a target: the all-four-hold-it worst case, ``predict`` (the router's
other per-request call) and bytes per block (tracemalloc). Random 64-bit hashes, one
``perf_counter_ns`` per call. Writes its section of ``docs/BENCHMARKS.md``::

    python bench/kv_index.py            # ~30 s
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import time
import tracemalloc
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.routing.kv_index import (  # noqa: E402
    ApplyStatus,
    BlocksRemoved,
    BlocksStored,
    KVEvent,
    KVIndex,
)
from loadtests.envinfo import hardware, hardware_line  # noqa: E402
from loadtests.mdsection import update_file  # noqa: E402

PROMPT_TOKENS = 32_768
BLOCK_SIZES = (16, 32)
REPLICAS = tuple(f"replica-{i}" for i in range(4))
RESIDENT_BLOCKS = 200_000  # across the 4 replicas
LOOKUP_REPS = 3_000
PREDICT_REPS = 500
EVENT_STREAM_BLOCKS = 400_000  # block events per throughput case
TARGET_LOOKUP_P50_US = 200.0
TARGET_BLOCK_EVENTS_PER_S = 100_000.0
SECTION = "bench:kv_index"
COMMAND = "python bench/kv_index.py"


@dataclass(frozen=True)
class Timing:
    name: str
    hashes: int
    p50_us: float
    p99_us: float
    target: bool  # counted in the lookup target


@dataclass(frozen=True)
class Throughput:
    name: str
    block_events_per_s: float
    kv_events_per_s: float
    batches_per_s: float


def random_hashes(rng: random.Random, n: int) -> tuple[int, ...]:
    return tuple(rng.getrandbits(64) for _ in range(n))


def fresh_copy(chain: tuple[int, ...] | list[int]) -> list[int]:
    """Equal hashes as new int objects, as the router's hasher makes them: a set lookup that
    finds the stored object itself skips the int comparison and would flatter the index."""
    return [int.from_bytes(h.to_bytes(8, "little"), "little") for h in chain]


def percentile(sorted_ns: list[int], q: float) -> float:
    return sorted_ns[min(len(sorted_ns) - 1, int(q * len(sorted_ns)))] / 1000


def time_calls(
    call: Callable[[list[int]], object], reps: int, prepare: Callable[[], list[int]]
) -> tuple[float, float]:
    """p50 and p99 in µs of ``reps`` calls of ``call(prepare())``, ``prepare`` untimed (it
    stands for the router's hasher, whose fresh hashes are still in cache), after a warm-up."""
    for _ in range(min(100, reps)):
        call(prepare())
    gc.collect()
    samples = []
    clock = time.perf_counter_ns
    for _ in range(reps):
        arg = prepare()
        start = clock()
        call(arg)
        samples.append(clock() - start)
    samples.sort()
    return percentile(samples, 0.50), percentile(samples, 0.99)


class Publisher:
    """Feeds one replica's events with consecutive sequence numbers, like vLLM's publisher."""

    def __init__(self, index: KVIndex, replica: str) -> None:
        self.index, self.replica, self.seq = index, replica, 0

    def send(self, events: list[KVEvent]) -> None:
        result = self.index.apply_batch(self.replica, self.seq, events)
        assert result.status is ApplyStatus.APPLIED, result
        self.seq += 1


class SteppingClock:
    """Advances ``step_s`` per reading: a steady request rate without sleeping."""

    def __init__(self, step_s: float) -> None:
        self.now, self.step_s = 0.0, step_s

    def __call__(self) -> float:
        self.now += self.step_s
        return self.now


def populated_index(
    rng: random.Random, index: KVIndex | None = None
) -> tuple[KVIndex, dict[str, Publisher], dict[str, deque[int]]]:
    """4 replicas holding RESIDENT_BLOCKS random blocks between them (also returned, oldest
    first, per replica)."""
    index = KVIndex() if index is None else index
    publishers, residents = {}, {}
    for name in REPLICAS:
        index.add_replica(name)
        publishers[name] = Publisher(index, name)
        resident = random_hashes(rng, RESIDENT_BLOCKS // len(REPLICAS))
        residents[name] = deque(resident)
        for i in range(0, len(resident), 1024):
            publishers[name].send([BlocksStored(resident[i : i + 1024])])
    return index, publishers, residents


def bench_lookups(rng: random.Random) -> list[Timing]:
    index, publishers, _ = populated_index(rng)
    full, half = REPLICAS[0], REPLICAS[1]
    timings = []
    for block_size in BLOCK_SIZES:
        n = PROMPT_TOKENS // block_size
        prompt, unseen = random_hashes(rng, n), random_hashes(rng, n)
        publishers[full].send([BlocksStored(prompt)])
        publishers[half].send([BlocksStored(prompt[: n // 2])])
        worst = random_hashes(rng, n)
        for name in REPLICAS:
            publishers[name].send([BlocksStored(worst)])
        cases = [
            (f"(a) one holds all, one half, two none, bs {block_size}", prompt, [n, n // 2, 0, 0]),
            (f"(b) nobody holds it, bs {block_size}", unseen, [0, 0, 0, 0]),
            (f"all four hold all (worst case), bs {block_size}", worst, [n, n, n, n]),
        ]
        for name, chain, expected in cases:
            query = fresh_copy(chain)
            assert list(index.overlaps(query).values()) == expected, name
            p50, p99 = time_calls(index.overlaps, LOOKUP_REPS, lambda q=query: q)
            target = not name.startswith("all four")
            timings.append(Timing(name, n, p50, p99, target))
    return timings


def bench_predict(rng: random.Random) -> list[Timing]:
    """Fresh hashes each call (a new prompt) and the same ones again (a refresh). The clock
    moves 20 ms per call, so ~100 calls' predictions are live and each call also expires an
    old call's: the expiry cost is included."""
    index, _, _ = populated_index(rng, KVIndex(predicted_ttl_s=2.0, clock=SteppingClock(0.02)))
    n = PROMPT_TOKENS // BLOCK_SIZES[0]
    p50_new, p99_new = time_calls(
        lambda c: index.predict(REPLICAS[0], c), PREDICT_REPS, lambda: list(random_hashes(rng, n))
    )
    again = random_hashes(rng, n)
    p50_again, p99_again = time_calls(
        lambda c: index.predict(REPLICAS[1], c), PREDICT_REPS, lambda: fresh_copy(again)
    )
    return [
        Timing(f"predict {n} new hashes", n, p50_new, p99_new, False),
        Timing(f"predict {n} hashes already predicted (refresh)", n, p50_again, p99_again, False),
    ]


def event_stream(
    rng: random.Random, residents: dict[str, deque[int]], per_event: int, per_batch: int
) -> list[tuple[str, list[KVEvent]]]:
    """Batches round-robin over the replicas; each replica's events alternate a store of new
    blocks with a removal of its oldest ones, so the resident count stays put."""
    batches: list[tuple[str, list[KVEvent]]] = []
    stores = dict.fromkeys(REPLICAS, True)
    blocks = 0
    while blocks < EVENT_STREAM_BLOCKS:
        name = REPLICAS[len(batches) % len(REPLICAS)]
        fifo = residents[name]
        events: list[KVEvent] = []
        for _ in range(per_batch):
            if stores[name]:
                new = random_hashes(rng, per_event)
                fifo.extend(new)
                events.append(BlocksStored(new))
            else:
                events.append(BlocksRemoved(tuple(fifo.popleft() for _ in range(per_event))))
            stores[name] = not stores[name]
            blocks += per_event
        batches.append((name, events))
    return batches


def bench_events(rng: random.Random) -> list[Throughput]:
    index, publishers, residents = populated_index(rng)
    results = []
    for per_event, per_batch in ((1, 1), (1, 16), (16, 1), (16, 16)):
        stream = []
        for name, events in event_stream(rng, residents, per_event, per_batch):
            stream.append((name, publishers[name].seq, events))
            publishers[name].seq += 1
        gc.collect()
        apply = index.apply_batch
        start = time.perf_counter_ns()
        for name, seq, events in stream:
            apply(name, seq, events)
        seconds = (time.perf_counter_ns() - start) / 1e9
        stats = index.stats()
        assert stats["gaps"] == stats["duplicates"] == 0, stats
        assert abs(stats["blocks"] - RESIDENT_BLOCKS) <= 16 * 16 * len(REPLICAS), stats
        blocks = sum(len(e.block_hashes) for _, _, ev in stream for e in ev)  # type: ignore[union-attr]
        kv_events = sum(len(ev) for _, _, ev in stream)
        results.append(
            Throughput(
                f"{per_event} hash/event, {per_batch} event/batch",
                blocks / seconds,
                kv_events / seconds,
                len(stream) / seconds,
            )
        )
    return results


def bench_memory() -> tuple[float, float]:
    """Bytes per (replica, block) with distinct blocks per replica, and with all 4 replicas
    holding the same blocks (hash objects shared); the hashes are the index's to keep."""
    out = []
    for shared in (False, True):
        rng = random.Random(7)
        gc.collect()
        tracemalloc.start()
        index = KVIndex()
        common = random_hashes(rng, RESIDENT_BLOCKS // len(REPLICAS)) if shared else ()
        for name in REPLICAS:
            index.add_replica(name)
            blocks = common or random_hashes(rng, RESIDENT_BLOCKS // len(REPLICAS))
            for seq, i in enumerate(range(0, len(blocks), 16)):
                index.apply_batch(name, seq, [BlocksStored(blocks[i : i + 16])])
        del common, blocks
        gc.collect()
        used, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert index.stats()["blocks"] == RESIDENT_BLOCKS
        out.append(used / RESIDENT_BLOCKS)
    return out[0], out[1]


def render(
    lookups: list[Timing],
    predicts: list[Timing],
    throughput: list[Throughput],
    memory: tuple[float, float],
    verdicts: list[str],
) -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [
        "## KV index microbenchmark (issue 7)",
        "",
        f"Command: `{COMMAND}` · {datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        "",
        f"Hardware: {hardware_line(hardware())}; load average at the end {load}.",
        "",
        f"`KVIndex.overlaps` of a {PROMPT_TOKENS // 1024}k-token prompt, 4 replicas holding "
        f"{RESIDENT_BLOCKS // 1000}k other blocks between them, {LOOKUP_REPS} calls per case:",
        "",
        "| case | hashes | p50 µs | p99 µs | target p50 |",
        "|---|---:|---:|---:|---|",
    ]
    for t in lookups + predicts:
        target = f"<= {TARGET_LOOKUP_P50_US:.0f} µs" if t.target else "(info)"
        lines.append(f"| {t.name} | {t.hashes} | {t.p50_us:.1f} | {t.p99_us:.1f} | {target} |")
    lines += [
        "",
        f"Applying events (`apply_batch`, sequence check included), 4 replicas, ~"
        f"{RESIDENT_BLOCKS // 1000}k resident blocks, half stores of new blocks and half "
        f"removals of old ones, {EVENT_STREAM_BLOCKS // 1000}k block events per case:",
        "",
        "| case | block events/s | KV events/s | batches/s |",
        "|---|---:|---:|---:|",
    ]
    for r in throughput:
        lines.append(
            f"| {r.name} | {r.block_events_per_s:,.0f} | {r.kv_events_per_s:,.0f} "
            f"| {r.batches_per_s:,.0f} |"
        )
    lines += [
        "",
        f"Memory (tracemalloc, hash objects included): {memory[0]:.0f} bytes per block with "
        f"distinct blocks per replica, {memory[1]:.0f} bytes per (replica, block) when all 4 "
        "replicas hold the same blocks.",
        "",
        *[f"- {v}" for v in verdicts],
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-docs", action="store_true", help="do not update BENCHMARKS.md")
    args = parser.parse_args()
    rng = random.Random(20240607)
    began = time.monotonic()

    lookups = bench_lookups(rng)
    for t in lookups:
        print(f"lookup  {t.name:<50} p50 {t.p50_us:7.1f} µs  p99 {t.p99_us:7.1f} µs")
    predicts = bench_predict(rng)
    for t in predicts:
        print(f"predict {t.name:<50} p50 {t.p50_us:7.1f} µs  p99 {t.p99_us:7.1f} µs")
    throughput = bench_events(rng)
    for r in throughput:
        print(
            f"events  {r.name:<32} {r.block_events_per_s:12,.0f} block events/s "
            f"{r.kv_events_per_s:12,.0f} KV events/s"
        )
    memory = bench_memory()
    print(f"memory  {memory[0]:.0f} B/block (distinct), {memory[1]:.0f} B/(replica, block) shared")

    worst_lookup = max(t.p50_us for t in lookups if t.target)
    slowest_events = min(r.block_events_per_s for r in throughput)
    ok_lookup = worst_lookup <= TARGET_LOOKUP_P50_US
    ok_events = slowest_events >= TARGET_BLOCK_EVENTS_PER_S
    verdicts = [
        f"{'PASS' if ok_lookup else 'FAIL'}: lookup p50 <= {TARGET_LOOKUP_P50_US:.0f} µs "
        f"(slowest target case {worst_lookup:.1f} µs)",
        f"{'PASS' if ok_events else 'FAIL'}: >= {TARGET_BLOCK_EVENTS_PER_S:,.0f} block events/s "
        f"(slowest case {slowest_events:,.0f}/s)",
    ]
    print("\n".join(verdicts))
    print(f"took {time.monotonic() - began:.1f} s")
    if not args.no_docs:
        body = render(lookups, predicts, throughput, memory, verdicts)
        update_file(ROOT / "docs" / "BENCHMARKS.md", SECTION, body)
        print(f"wrote section {SECTION} of docs/BENCHMARKS.md")
    return 0 if ok_lookup and ok_events else 1


if __name__ == "__main__":
    sys.exit(main())

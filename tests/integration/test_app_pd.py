"""End to end over real HTTP: Ray Serve, two vLLM-CPU engines, NIXL KV transfers.

One Ray cluster for the module with two applications side by side: the disaggregated app at
/pd and the aggregated baseline at /agg. Greedy outputs of the random-weight tiny model are
deterministic, so "P/D equals aggregated, token for token" is an exact check.
"""

from __future__ import annotations

import json
import random
import time

import httpx
import openai
import psutil
import pytest

from tests.integration.serve_harness import (
    BLOCK_SIZE,
    MAX_MODEL_LEN,
    MODEL_NAME,
    app_config,
    client,
    deploy,
    engine_handle,
    engine_stats,
    start_serve,
    stop_serve,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

_WORDS = "cache block prefill decode engine token stream replica router latency batch".split()


def make_prompt(seed: int, words: int = 120) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(_WORDS) for _ in range(words))


@pytest.fixture(scope="module")
def urls():
    port = start_serve(num_cpus=4)
    try:
        deploy(app_config("disaggregated"), "pd", "/pd")
        deploy(app_config("aggregated"), "agg", "/agg")
        base = f"http://127.0.0.1:{port}"
        yield {"pd": f"{base}/pd", "agg": f"{base}/agg"}
    finally:
        stop_serve()


def _completion(url: str, **body) -> httpx.Response:
    payload = {"model": MODEL_NAME, "temperature": 0, "max_tokens": 24, **body}
    with client(url) as c:
        return c.post("/v1/completions", json=payload)


def _stream_events(url: str, path: str, body: dict) -> tuple[httpx.Headers, list[dict]]:
    events = []
    with client(url) as c, c.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[len("data: "):]))
        return r.headers, events


# --- correctness: disaggregated == aggregated ------------------------------------------------


def test_completion_matches_aggregated_token_for_token(urls):
    body = {"prompt": make_prompt(1), "return_token_ids": True}
    pd, agg = _completion(urls["pd"], **body), _completion(urls["agg"], **body)
    assert pd.status_code == agg.status_code == 200
    assert pd.headers["x-pd-route"] == "disaggregated"
    assert agg.headers["x-pd-route"] == "aggregated"
    pd_choice, agg_choice = pd.json()["choices"][0], agg.json()["choices"][0]
    assert len(pd_choice["token_ids"]) == 24
    assert pd_choice["token_ids"] == agg_choice["token_ids"]
    assert pd_choice["text"] == agg_choice["text"]
    assert pd.json()["usage"] == agg.json()["usage"]
    assert pd.json()["kv_transfer_params"] is None  # internal handoff data never leaks


def test_streamed_completion_matches_aggregated(urls):
    body = {
        "model": MODEL_NAME,
        "prompt": make_prompt(2),
        "max_tokens": 20,
        "temperature": 0,
        "return_token_ids": True,
        "stream_options": {"include_usage": True},
    }
    pd_headers, pd_events = _stream_events(urls["pd"], "/v1/completions", body)
    _, agg_events = _stream_events(urls["agg"], "/v1/completions", body)
    assert pd_headers["x-pd-route"] == "disaggregated"
    assert pd_headers["content-type"].startswith("text/event-stream")

    def tokens(events):
        return [t for e in events for c in e["choices"] for t in (c.get("token_ids") or [])]

    assert len(tokens(pd_events)) == 20
    assert tokens(pd_events) == tokens(agg_events)
    assert pd_events[-1]["usage"]["completion_tokens"] == 20
    assert pd_events[-1]["usage"] == agg_events[-1]["usage"]


def test_chat_matches_aggregated_streaming_and_not(urls):
    messages = [
        {"role": "system", "content": "you are a test"},
        {"role": "user", "content": make_prompt(3, 60)},
    ]
    body = {"model": MODEL_NAME, "messages": messages, "max_tokens": 16, "temperature": 0}
    with client(urls["pd"]) as c:
        pd = c.post("/v1/chat/completions", json=body)
    with client(urls["agg"]) as c:
        agg = c.post("/v1/chat/completions", json=body)
    assert pd.status_code == 200 and pd.headers["x-pd-route"] == "disaggregated"
    pd_text = pd.json()["choices"][0]["message"]["content"]
    assert pd_text == agg.json()["choices"][0]["message"]["content"]
    assert pd.json()["usage"]["completion_tokens"] == 16

    _, events = _stream_events(urls["pd"], "/v1/chat/completions", body)
    streamed = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
    assert streamed == pd_text


def _ids_of(url: str, text: str) -> list[int]:
    r = _completion(url, prompt=text, max_tokens=1, return_token_ids=True)
    return r.json()["choices"][0]["prompt_token_ids"]


def _agreed_until_near_tie(url: str, prompt: list[int], tokens: list[int], n: int) -> int:
    """Positions where ``tokens`` equal the aggregated greedy run, compared teacher-forced up
    to the first near-tie of its top-2 logprobs (bf16: a tie flips with any rounding)."""
    r = _completion(url, prompt=prompt, max_tokens=n, ignore_eos=True, logprobs=2,
                    return_token_ids=True)
    choice = r.json()["choices"][0]
    for i, (ref, top) in enumerate(zip(choice["token_ids"], choice["logprobs"]["top_logprobs"],
                                       strict=True)):
        best = sorted(top.values(), reverse=True)
        if len(best) > 1 and best[0] - best[1] < 1e-2:
            return i  # a near-tie: later tokens may differ without a bug
        assert tokens[i] == ref, f"token {i}: {tokens[i]} vs aggregated {ref}"
    return n


@pytest.mark.parametrize("extra", [5, 0], ids=["token-one-from-prefill", "block-aligned"])
def test_stream_token_one_from_prefill_unless_the_prompt_fills_its_last_block(urls, extra):
    """A streamed request gets prefill's token 1 at once and decode continues after it
    (handoff.first_token_from_prefill); a prompt ending on a block boundary takes the usual
    path (one more token would need a block prefill does not hold)."""
    prompt = _ids_of(urls["agg"], make_prompt(11, 200))[: 3 * BLOCK_SIZE + extra]
    before = engine_stats("pd", "DecodeServer")
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 20, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True,
            "stream_options": {"include_usage": True}}
    headers, events = _stream_events(urls["pd"], "/v1/completions", body)
    assert headers["x-pd-route"] == "disaggregated"
    after = engine_stats("pd", "DecodeServer")
    source = "prefill" if extra else "decode"
    other = "decode" if extra else "prefill"
    assert after[f"token_one_{source}"] == before[f"token_one_{source}"] + 1
    assert after[f"token_one_{other}"] == before[f"token_one_{other}"]
    tokens = [t for e in events for c in e["choices"] for t in (c.get("token_ids") or [])]
    assert len(tokens) == 20
    assert len({e["id"] for e in events}) == 1
    assert events[-1]["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 20,
                                   "total_tokens": len(prompt) + 20}
    assert _agreed_until_near_tie(urls["agg"], prompt, tokens, 20) >= 1


def test_decode_engine_loads_prompt_kv_remotely(urls):
    before_d = engine_stats("pd", "DecodeServer")
    before_p = engine_stats("pd", "PrefillServer")
    r = _completion(urls["pd"], prompt=make_prompt(4, 300), max_tokens=4)
    assert r.status_code == 200 and r.headers["x-pd-route"] == "disaggregated"
    prompt_tokens = r.json()["usage"]["prompt_tokens"]
    assert prompt_tokens > 4 * BLOCK_SIZE

    def moved():
        d = engine_stats("pd", "DecodeServer")
        delta = d["prompt_tokens_total"] - before_d["prompt_tokens_total"]
        return d if delta >= prompt_tokens else None

    after_d = wait_until(moved, 30, what="decode prompt stats")
    after_p = engine_stats("pd", "PrefillServer")
    remote = after_d["prompt_tokens_external_kv_transfer"] - before_d[
        "prompt_tokens_external_kv_transfer"
    ]
    computed = after_d["prompt_tokens_computed"] - before_d["prompt_tokens_computed"]
    assert remote >= prompt_tokens - BLOCK_SIZE
    assert computed <= BLOCK_SIZE
    assert after_d["kv_transfers"] > before_d["kv_transfers"]
    assert after_d["kv_bytes_transferred"] > before_d["kv_bytes_transferred"]
    assert after_p["prompt_tokens_computed"] - before_p["prompt_tokens_computed"] >= (
        prompt_tokens - BLOCK_SIZE
    )
    # the prefill leg took the prefill plane (handoff.prefill_plane, on by default), not the
    # handle: the replica served it
    assert after_p["plane_calls"] > before_p["plane_calls"]


# --- clients and errors ----------------------------------------------------------------------


def test_official_openai_client(urls):
    oai = openai.OpenAI(base_url=f"{urls['pd']}/v1", api_key="unused", timeout=120)
    models = oai.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]

    done = oai.completions.create(model=MODEL_NAME, prompt=make_prompt(5), max_tokens=8)
    assert done.usage.completion_tokens == 8 and done.choices[0].text

    stream = oai.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": make_prompt(6, 40)}],
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8


@pytest.mark.parametrize(
    ("body", "param_hint"),
    [
        ({"model": "no-such-model", "prompt": "hi"}, "model"),
        ({"model": MODEL_NAME, "prompt": "hi", "temperature": -1}, "temperature"),
        ({"model": MODEL_NAME, "prompt": "hi", "max_tokens": -5}, "max_tokens"),
        ({"model": MODEL_NAME, "prompt": "hi", "top_p": 7}, "top_p"),
        ({"model": MODEL_NAME}, "prompt"),
        ({"model": MODEL_NAME, "prompt": "cache " * (MAX_MODEL_LEN + 100)}, "context"),
    ],
    ids=["unknown-model", "temperature", "max-tokens", "top-p", "no-prompt", "too-long"],
)
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_bad_requests_get_openai_400(urls, body, param_hint, stream):
    with client(urls["pd"]) as c:
        r = c.post("/v1/completions", json={**body, "stream": stream})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "code"}
    assert err["code"] == 400
    assert param_hint in (err["message"] + str(err.get("param"))).lower()


def test_malformed_json_gets_400(urls):
    with client(urls["pd"]) as c:
        r = c.post(
            "/v1/chat/completions",
            content=b'{"model": "tiny-llama", "messages": [',
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 400
        assert "json" in r.json()["error"]["message"].lower()
        r = c.post("/v1/chat/completions", json=[1, 2])
        assert r.status_code == 400


def test_n_greater_than_one_runs_aggregated_on_decode(urls):
    # vLLM refuses n>1 with greedy sampling, so sample.
    r = _completion(urls["pd"], prompt=make_prompt(7), n=2, max_tokens=4, temperature=0.8)
    assert r.status_code == 200
    assert r.headers["x-pd-route"] == "aggregated"
    assert len(r.json()["choices"]) == 2


# --- resources -------------------------------------------------------------------------------


def test_client_disconnect_frees_kv_on_both_engines(urls):
    idle_d = engine_stats("pd", "DecodeServer")["kv_cache_usage"]
    idle_p = engine_stats("pd", "PrefillServer")["kv_cache_usage"]
    body = {
        "model": MODEL_NAME,
        "prompt": make_prompt(8, 400),
        "max_tokens": 1500,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    peak = 0.0
    with client(urls["pd"]) as c, c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        received = 0
        for line in r.iter_lines():
            if line.startswith("data: "):
                received += 1
            if received == 20:
                peak = engine_stats("pd", "DecodeServer")["kv_cache_usage"]
                break
    # The connection is closed here, mid-stream, with ~1480 tokens still to go.
    assert peak > idle_d, "decode engine should hold the request's KV while streaming"

    def released():
        d = engine_stats("pd", "DecodeServer")
        p = engine_stats("pd", "PrefillServer")
        ok = (
            d["kv_cache_usage"] <= idle_d
            and p["kv_cache_usage"] <= idle_p
            and d["num_running_reqs"] == 0
            and p["num_running_reqs"] == 0
        )
        return (d, p) if ok else None

    d, _ = wait_until(released, 60, what="KV blocks released after disconnect")
    assert d["generation_tokens"] > 0
    # The request was aborted, not run to completion: far fewer than 1500 tokens were made.
    time.sleep(2)
    after = engine_stats("pd", "DecodeServer")
    assert after["generation_tokens"] == d["generation_tokens"]


def test_client_gone_right_after_token_one_frees_kv_on_both_engines(urls):
    """Token 1 comes from prefill before decode has the request: a client leaving then must
    not strand the prompt's blocks on prefill (NIXL's lease would hold them 30 s) nor leave
    the continuation running on decode.

    Decode is asked for the continuation only after token 1 is written, so right after the
    client leaves both engines can still look idle: the decode leg may not have reached its
    engine yet, and it makes a few tokens before the front sees the closed socket and aborts
    it. So the wait is for a *settled* state (idle, and decode's token count unchanged over
    three looks a second apart), and the check is that the continuation made a few tokens,
    not its 1,499."""
    stats_d = engine_stats("pd", "DecodeServer")
    idle_d, made_before = stats_d["kv_cache_usage"], stats_d["generation_tokens"]
    idle_p = engine_stats("pd", "PrefillServer")["kv_cache_usage"]
    before = stats_d["token_one_prefill"]
    body = {"model": MODEL_NAME, "prompt": make_prompt(12, 400), "max_tokens": 1500,
            "temperature": 0, "ignore_eos": True, "stream": True}
    started = time.monotonic()
    with client(urls["pd"]) as c, c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # token 1: leave at once
    assert engine_stats("pd", "DecodeServer")["token_one_prefill"] == before + 1

    looks: list[int] = []

    def settled():
        d = engine_stats("pd", "DecodeServer")
        p = engine_stats("pd", "PrefillServer")
        idle = (d["kv_cache_usage"] <= idle_d and p["kv_cache_usage"] <= idle_p
                and d["num_running_reqs"] == 0 and p["num_running_reqs"] == 0
                and d["num_waiting_reqs"] == 0 and p["num_waiting_reqs"] == 0)
        looks.append(d["generation_tokens"] if idle else -1)
        return d if len(looks) >= 3 and len(set(looks[-3:])) == 1 and looks[-1] >= 0 else None

    d = wait_until(settled, 20, interval=1.0,
                   what="both engines idle after leaving at token 1")
    assert time.monotonic() - started < 20  # well inside the 30 s lease
    made = d["generation_tokens"] - made_before
    assert made < 200, (f"decode made {made} tokens after the client left at token 1: the "
                        "continuation was not aborted (it asks for 1,499)")


def test_decode_abandoned_before_it_starts_frees_prefill_blocks_now(urls):
    """Decode leg dropped right after its Head: the prefill engine must free the prompt's
    blocks now, not when NIXL's 30 s lease expires. Through a Ray handle the replica starts
    the engine stream eagerly, so vLLM's own abort frees them (checked: this passes without
    ``EngineHost._release_remote_prefill``); that release covers the in-process path, where
    nothing starts the stream, and is unit-tested in ``tests/unit/test_engine_protocol.py``."""
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    from app.pd_requests import decode_request, prefill_request

    idle_p = engine_stats("pd", "PrefillServer")["kv_cache_usage"]
    request = CompletionRequest(model=MODEL_NAME, prompt=make_prompt(10, 400), max_tokens=8,
                                stream=True)
    head = engine_handle("pd", "PrefillServer").generate_once.remote(
        "completion", prefill_request("completion", request)).result(timeout_s=60)
    params = head.body["kv_transfer_params"]
    assert params["remote_block_ids"], params
    held = engine_stats("pd", "PrefillServer")["kv_cache_usage"]
    assert held > idle_p, "prefill engine should hold the blocks for the decode engine"

    started = time.monotonic()
    stream = engine_handle("pd", "DecodeServer").options(stream=True).generate.remote(
        "completion", decode_request(request, params))
    assert next(iter(stream)).kind == "stream"
    stream.cancel()  # leave after the Head, before asking for a token
    wait_until(lambda: engine_stats("pd", "PrefillServer")["kv_cache_usage"] <= idle_p, 20,
               what="prefill blocks released")
    assert time.monotonic() - started < 20  # well inside the 30 s lease


def test_engines_are_pinned_and_idle_engines_do_not_spin(urls):
    time.sleep(3)  # past vLLM's 1 s busy-wait after the last request
    for deployment, core in (("PrefillServer", 0), ("DecodeServer", 1)):
        affinity = engine_stats("pd", deployment)["affinity"]
        assert affinity, f"{deployment} reported no engine processes"
        assert all(cores == [core] for cores in affinity.values()), affinity
        procs = [psutil.Process(int(pid)) for pid in affinity]
        for p in procs:
            p.cpu_percent(None)
        time.sleep(3.0)
        busy = sum(p.cpu_percent(None) for p in procs)
        # NIXL's default 0 µs progress delay keeps one core at ~100% per idle engine.
        assert busy < 40.0, f"{deployment} engine processes use {busy:.0f}% CPU while idle"


def test_each_engine_gets_its_roles_engine_process_patches(urls):
    """Decode under pull only starts and polls its READs, so its NIXL progress thread sleeps
    longer (nixl.reader_progress_delay_us); prefill, the READ's target, keeps the short one.
    Decode's engine core also polls for the READ's end more often than vLLM's 1 ms
    (engine_process.kv_wait_sleep_s) and posts a step's READs before its forward pass
    (kv_reads_before_forward); prefill keeps vLLM's behaviour. The
    engine-process plugin reads all of them from the environment the engines inherit."""
    from app.config import AppConfig
    from app.engine_process import KV_READS_FIRST_ENV, KV_WAIT_SLEEP_ENV, NIXL_DELAY_ENV

    cfg = AppConfig.model_validate(app_config("disaggregated"))
    assert cfg.nixl.reader_progress_delay_us != cfg.nixl.progress_delay_us
    assert cfg.kv_wait_sleep_s("decode") is not None and cfg.kv_wait_sleep_s("prefill") is None
    for deployment, role in (("PrefillServer", "prefill"), ("DecodeServer", "decode")):
        pids = engine_stats("pd", deployment)["affinity"]
        assert pids, f"{deployment} reported no engine processes"
        environs = [psutil.Process(int(pid)).environ() for pid in pids]
        delays = {env.get(NIXL_DELAY_ENV) for env in environs}
        assert delays == {str(cfg.nixl_progress_delay_us(role))}, (deployment, delays)
        sleep = cfg.kv_wait_sleep_s(role)
        sleeps = {env.get(KV_WAIT_SLEEP_ENV) for env in environs}
        assert sleeps == {None if sleep is None else str(sleep)}, (deployment, sleeps)
        reads_first = cfg.reads_before_forward(role)
        assert reads_first == (role == "decode")
        assert {env.get(KV_READS_FIRST_ENV) for env in environs} == {
            "1" if reads_first else "0"}, deployment


# --- failure: prefill gone ------------------------------------------------------------------


def test_prefill_replica_killed_falls_back_to_local_prefill(urls):
    """Runs last in the module: it kills the prefill replica."""
    import ray

    body = {"prompt": make_prompt(9), "return_token_ids": True, "max_tokens": 12}
    expected = _completion(urls["agg"], **body).json()["choices"][0]["token_ids"]

    actors = [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if "PrefillServer" in a["name"] and a["name"].startswith("SERVE_REPLICA")
    ]
    assert actors, "no prefill replica actor found"
    for a in actors:
        ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=True)

    r = _completion(urls["pd"], **body)
    assert r.status_code == 200, r.text
    assert r.headers["x-pd-route"] == "fallback"
    assert r.json()["choices"][0]["token_ids"] == expected

    headers, events = _stream_events(
        urls["pd"], "/v1/completions", {"model": MODEL_NAME, "temperature": 0, **body}
    )
    assert headers["x-pd-route"] in ("fallback", "disaggregated")  # replica may be back
    streamed = [t for e in events for c in e["choices"] for t in (c.get("token_ids") or [])]
    assert streamed == expected

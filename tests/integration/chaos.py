"""Helpers of the chaos tests (test_failover, test_front_failover): streamed completions in
threads, their unbroken reference, and each engine replica's stats."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time

import httpx

from tests.integration.serve_harness import MODEL_NAME, engine_handle, wait_until

STREAMS = 32
TOKENS = 48
_WORDS = "cache block prefill decode engine token stream replica router latency".split()
# 2 replicas per phase on the two cores, unpinned; float32 so that greedy output does not
# depend on batching, replica or cache hits.
UNPINNED = {"num_replicas": 2, "cpu_cores": None, "engine_args": {"dtype": "float32"},
            "env": {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}}


def prompt(i: int) -> str:
    rng = random.Random(i)
    return " ".join(rng.choice(_WORDS) for _ in range(200 + i % 100))


def replica_stats(app: str, deployment: str, want: int = 2, strict: bool = True
                  ) -> dict[str, dict]:
    """Each replica's stats (handle calls land on random replicas: ask until all answered)."""
    found: dict[str, dict] = {}
    handle = engine_handle(app, deployment)
    deadline = time.monotonic() + 60
    while len(found) < want and time.monotonic() < deadline:
        s = handle.stats.remote().result(timeout_s=30)
        found[s["replica"]] = s
    assert len(found) == want or not strict, found.keys()
    return found


class Stream(threading.Thread):
    """One streamed completion: its text, events, token ids and final usage."""

    def __init__(self, url: str, i: int):
        super().__init__(daemon=True)
        self.url, self.i = url, i
        self.text, self.events, self.usage, self.ids = "", 0, [], []
        self.times: list[float] = []
        self.error: str | None = None
        self.done = False

    def run(self) -> None:
        body = {"model": MODEL_NAME, "prompt": prompt(self.i), "max_tokens": TOKENS,
                "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}, "return_token_ids": True}
        try:
            with httpx.stream("POST", f"{self.url}/v1/completions", json=body,
                              timeout=httpx.Timeout(300.0)) as r:
                if r.status_code != 200:
                    self.error = f"HTTP {r.status_code}: {r.read()[:300]!r}"
                    return
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        self.done = True
                        continue
                    obj = json.loads(data)
                    if "error" in obj:
                        self.error = f"error event: {obj['error']}"
                        return
                    for c in obj.get("choices") or []:
                        self.text += c.get("text") or ""
                        self.ids += c.get("token_ids") or []
                        self.events += 1
                        self.times.append(time.monotonic())
                    if obj.get("usage") and not obj.get("choices"):
                        self.usage.append(obj["usage"])
        except Exception as exc:  # noqa: BLE001 - recorded as the stream's failure
            self.error = f"{type(exc).__name__}: {exc}"


def run_streams(url: str, chaos=None) -> list[Stream]:
    streams = [Stream(url, i) for i in range(STREAMS)]
    for s in streams:
        s.start()
    if chaos is not None:
        chaos(streams)
    for s in streams:
        s.join(300)
    return streams


def assert_unbroken(streams: list[Stream], reference: dict) -> None:
    failed = {s.i: s.error for s in streams if s.error or not s.done}
    assert not failed, failed
    for s in streams:
        ids, text = reference[s.i]
        assert len(s.ids) == TOKENS and s.ids == ids, (s.i, s.ids, ids)
        assert s.text == text, (s.i, s.text, text)
        assert len(s.usage) == 1 and s.usage[0]["completion_tokens"] == TOKENS, s.usage


def completion(url: str, i: int, out: dict) -> None:
    """One non-streamed completion of prompt ``i``: ``out[i] = (status, text or error)``."""
    body = {"model": MODEL_NAME, "prompt": prompt(i), "max_tokens": TOKENS, "temperature": 0,
            "ignore_eos": True}
    try:
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=httpx.Timeout(300.0))
        out[i] = (r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200
                  else r.text[:300])
    except Exception as exc:  # noqa: BLE001 - recorded as the request's failure
        out[i] = (None, f"{type(exc).__name__}: {exc}")


def replica_processes(app: str, deployment: str) -> dict[str, list[int]]:
    """Each replica's processes, its Ray actor first, then its engine's (from its stats):
    killing them in that order takes the whole replica down before its engine, so nothing
    in it can hand a request over."""
    from tests.integration.actors import alive_replicas

    engines = {r: [int(p) for p in s["affinity"]]
               for r, s in replica_stats(app, deployment).items()}
    actors = {a.replica_id: a.pid for a in alive_replicas(app, deployment)}
    assert set(engines) <= set(actors), (engines, actors)
    return {r: [actors[r], *pids] for r, pids in engines.items()}


def kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_replaced(app: str, deployment: str, replica: str) -> None:
    """Until Ray has replaced ``replica`` (two replicas answer, ``replica`` not among them)."""
    def replaced() -> bool:
        stats = replica_stats(app, deployment, strict=False)
        return len(stats) == 2 and replica not in stats

    wait_until(replaced, 300, interval=3, what=f"killed {deployment} replica replaced")


def assert_completions(results: dict[int, tuple], n: int, reference: dict) -> None:
    """All ``n`` non-streamed completions (``completion``) answered 200 with the unbroken
    run's text."""
    failed = {i: r for i, r in results.items() if r[0] != 200}
    assert len(results) == n and not failed, failed
    for i, (_, text) in results.items():
        assert text == reference[i][1], (i, text, reference[i][1])

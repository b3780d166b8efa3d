"""Hostile and malformed input over real HTTP: limits, slow clients, API keys, fuzzing.

One P/D app (tiny model, prefill + decode engines, NIXL) behind HAProxy with small limits
(64 KiB bodies, JSON depth 32, 3 s to send a body) and an API-key file. Every request either
succeeds or gets an OpenAI-format 4xx: never a 5xx, never a hang.
"""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.serve_harness import (
    MODEL_NAME,
    app_config,
    deploy,
    engine_stats,
    start_serve,
    stop_serve,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

KEY = "sk-test-4f1c9e"
MAX_BYTES = 64 * 1024
BODY_TIMEOUT_S = 3
CLIENT_TIMEOUT_S = 4  # HAProxy's client timeout (app/serve_env.py), lowered to test it
AUTH = {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "api_keys"
    keys.write_text(f"# test keys\n{KEY}\nsk-other\n")
    port = start_serve(num_cpus=4, env={"RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S":
                                        str(CLIENT_TIMEOUT_S)})
    try:
        deploy(app_config("disaggregated", server={
            "max_request_bytes": MAX_BYTES, "max_json_depth": 32,
            "body_timeout_s": BODY_TIMEOUT_S, "api_keys_file": str(keys)}), "pd", "/")
        yield {"base": f"http://127.0.0.1:{port}", "port": port}
    finally:
        stop_serve()


def _client(app) -> httpx.Client:
    return httpx.Client(base_url=app["base"], timeout=httpx.Timeout(60.0), headers=AUTH)


def _assert_openai_error(r: httpx.Response, status: int, words: str) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == status and set(err) >= {"message", "type", "param", "code"}
    assert words in err["message"].lower(), err


# --- API keys --------------------------------------------------------------------------------


def test_api_key_required_on_v1_and_health_open(app):
    body = {"model": MODEL_NAME, "prompt": "hello", "max_tokens": 2}
    with httpx.Client(base_url=app["base"], timeout=60) as c:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": KEY}):
            _assert_openai_error(c.post("/v1/completions", json=body, headers=headers), 401,
                                 "api key")
            _assert_openai_error(c.get("/v1/models", headers=headers), 401, "api key")
        assert c.get("/health").status_code == 200
        for key in (KEY, "sk-other"):
            r = c.post("/v1/completions", json=body, headers={"authorization": f"Bearer {key}"})
            assert r.status_code == 200, r.text
        assert c.get("/v1/models", headers=AUTH).status_code == 200


# --- limits and slow clients -----------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_deeply_nested_json_is_400(app, path):
    for depth in (33, 100_000):
        body = b'{"model": "tiny-llama", "x": ' + b"[" * depth + b"]" * depth + b"}"
        if len(body) > MAX_BYTES:  # the 100,000-deep body: 413 before parsing
            with _client(app) as c:
                _assert_openai_error(c.post(path, content=body), 413, "larger than")
            continue
        with _client(app) as c:
            _assert_openai_error(c.post(path, content=body), 400, "deeper than 32")


def test_deep_json_within_size_is_400_with_a_larger_limit(app):
    # 20,000 levels in 40 kB: past Python's recursion limit, within the size limit.
    body = b'{"model": "tiny-llama", "prompt": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"
    assert len(body) < MAX_BYTES
    with _client(app) as c:
        _assert_openai_error(c.post("/v1/completions", content=body), 400, "deeper than")


def test_oversized_body_is_413_declared_or_chunked(app):
    big = {"model": MODEL_NAME, "prompt": "x" * (MAX_BYTES + 10), "max_tokens": 1}
    with _client(app) as c:
        _assert_openai_error(c.post("/v1/completions", json=big), 413, "larger than")

        def chunks():
            data = json.dumps(big).encode()
            for i in range(0, len(data), 8192):
                yield data[i:i + 8192]

        _assert_openai_error(c.post("/v1/completions", content=chunks()), 413, "larger than")


def _raw(port: int, data: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(data)
    return s


def _read_status(s: socket.socket, timeout: float) -> tuple[int | None, float]:
    t0 = time.monotonic()
    s.settimeout(timeout)
    buf = b""
    try:
        while b"\r\n" not in buf:
            got = s.recv(4096)
            if not got:
                break
            buf += got
    except TimeoutError:
        return None, time.monotonic() - t0
    line = buf.split(b"\r\n", 1)[0].split()
    return (int(line[1]) if len(line) > 1 else None), time.monotonic() - t0


def test_slow_body_times_out_with_408_and_holds_no_engine(app):
    """A client that declares 1,000 bytes and sends 10 (slow-loris body): 408 after the body
    timeout, while the engines see nothing and keep serving others."""
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n").encode()
    slow = [_raw(app["port"], head + b'{"model": ') for _ in range(8)]
    try:
        time.sleep(0.5)
        with _client(app) as c:  # others are served meanwhile
            r = c.post("/v1/completions", json={"model": MODEL_NAME, "prompt": "hi",
                                                "max_tokens": 4})
            assert r.status_code == 200, r.text
        assert engine_stats("pd", "DecodeServer")["num_running_reqs"] == 0
        for s in slow:
            status, waited = _read_status(s, timeout=BODY_TIMEOUT_S + 30)
            assert status == 408, status
            assert waited < BODY_TIMEOUT_S + 15
    finally:
        for s in slow:
            s.close()


def test_slow_headers_never_reach_an_engine(app):
    """Headers trickling in are held by HAProxy, not by a replica or an engine."""
    s = _raw(app["port"], b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    try:
        time.sleep(1.0)
        stats = engine_stats("pd", "DecodeServer")
        assert stats["num_running_reqs"] == 0 and stats["num_waiting_reqs"] == 0
        with _client(app) as c:
            assert c.get("/v1/models").status_code == 200
    finally:
        s.close()


def test_haproxy_drops_slow_headers_but_not_long_generations(app):
    """Headers not complete within HAProxy's client timeout: 408 and the connection closed. A
    request whose answer takes longer than that timeout is not cut (HAProxy then waits on
    the server side), streamed or not."""
    s = _raw(app["port"], b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    try:
        s.settimeout(CLIENT_TIMEOUT_S + 30)
        t0 = time.monotonic()
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert CLIENT_TIMEOUT_S - 1 <= time.monotonic() - t0 < CLIENT_TIMEOUT_S + 20
    finally:
        s.close()
    body = {"model": MODEL_NAME, "prompt": "a long answer", "max_tokens": 1800,
            "ignore_eos": True, "temperature": 0}
    with _client(app) as c:
        t0 = time.monotonic()
        r = c.post("/v1/completions", json=body, timeout=300)
        took = time.monotonic() - t0
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 1800
        assert took > CLIENT_TIMEOUT_S + 0.5, f"{took:.1f}s: too fast to test the timeout"
        t0 = time.monotonic()
        with c.stream("POST", "/v1/completions", json={**body, "stream": True},
                      timeout=300) as stream:
            lines = [line for line in stream.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        assert time.monotonic() - t0 > CLIENT_TIMEOUT_S + 0.5


# --- fuzzing ---------------------------------------------------------------------------------

_scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
_json = st.recursive(_scalar, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=8), kids, max_size=4)),
    max_leaves=12)
_small_tokens = st.one_of(st.integers(-3, 6), st.integers(10**6, 10**12), st.just(2.5),
                          st.just("4"))
_prompt = st.one_of(st.text(max_size=200), st.lists(st.integers(-5, 70_000), max_size=40),
                    st.lists(st.text(max_size=20), max_size=3), st.just([[1, 2], [3]]),
                    st.just(""), st.just([]), _json)
_common = {
    "model": st.one_of(st.just(MODEL_NAME), st.text(max_size=10), st.none(), st.integers()),
    "max_tokens": _small_tokens,
    "stream": st.one_of(st.booleans(), st.just("yes")),
    "temperature": st.one_of(st.floats(-1, 3, allow_nan=False), st.just("hot"), st.none()),
    "top_p": st.one_of(st.floats(-1, 2, allow_nan=False), st.none()),
    "top_k": st.one_of(st.integers(-2, 100), st.none()),
    "n": st.one_of(st.integers(-1, 3), st.just(10**6)),
    "seed": st.one_of(st.integers(-(2**70), 2**70), st.none()),
    "stop": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=5),
                      st.integers()),
    "logprobs": st.one_of(st.integers(-1, 30), st.booleans(), st.none()),
    "presence_penalty": st.floats(-5, 5, allow_nan=False),
    "logit_bias": st.one_of(st.dictionaries(st.text(max_size=6), st.floats(-200, 200),
                                            max_size=3), _json),
    "stream_options": st.one_of(st.just({"include_usage": True}), _json),
    "ignore_eos": st.booleans(),
    "min_tokens": st.integers(-2, 10),
    "kv_transfer_params": _json,
    "user": _json,
}
_completion_fields = {**_common, "prompt": _prompt, "echo": st.booleans(),
                      "best_of": st.integers(-1, 3), "suffix": st.text(max_size=5)}
_content = st.one_of(st.text(max_size=120), st.none(), _json,
                     st.lists(st.fixed_dictionaries({"type": st.just("text"),
                                                     "text": st.text(max_size=40)}),
                              max_size=2))
_message = st.one_of(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "robot"]),
     "content": _content}), _json)
_chat_fields = {**_common, "messages": st.one_of(st.lists(_message, max_size=4), _json),
                "top_logprobs": st.integers(-1, 25),
                "response_format": st.one_of(st.just({"type": "json_object"}), _json)}


# Requests a client could mean: every field within its valid range.
_valid_common = {
    "temperature": st.floats(0, 2), "top_p": st.floats(0.05, 1), "top_k": st.integers(-1, 50),
    "seed": st.integers(0, 2**31), "presence_penalty": st.floats(-2, 2),
    "stop": st.lists(st.text(min_size=1, max_size=4), max_size=2), "ignore_eos": st.booleans(),
    "min_tokens": st.integers(0, 1), "stream": st.booleans(),
    "stream_options": st.just({"include_usage": True}), "user": st.text(max_size=10),
    "logit_bias": st.dictionaries(st.integers(0, 4095).map(str), st.floats(-5, 5),
                                  max_size=2),
}
_valid_completion = st.fixed_dictionaries(
    {"model": st.just(MODEL_NAME), "max_tokens": st.integers(1, 4),
     "prompt": st.one_of(st.text(min_size=1, max_size=200),
                         st.lists(st.integers(0, 4095), min_size=1, max_size=60))},
    optional={**_valid_common, "echo": st.booleans(), "logprobs": st.integers(0, 3),
              "n": st.integers(1, 2)})
_valid_chat = st.fixed_dictionaries(
    {"model": st.just(MODEL_NAME), "max_tokens": st.integers(1, 4),
     "messages": st.lists(st.fixed_dictionaries(
         {"role": st.sampled_from(["user", "system", "assistant"]),
          "content": st.text(min_size=1, max_size=80)}), min_size=1, max_size=3)},
    optional={**_valid_common, "logprobs": st.booleans(), "top_logprobs": st.integers(0, 3),
              "n": st.integers(1, 2)})


def _corrupt(valid: st.SearchStrategy, fields: dict) -> st.SearchStrategy:
    """A valid request with one field set to a hostile value (or a hostile field added)."""
    names = sorted(fields)

    @st.composite
    def corrupted(draw):
        body = dict(draw(valid))
        name = draw(st.sampled_from(names))
        body[name] = draw(st.one_of(fields[name], _json))
        return body

    return corrupted()


def _bodies(fields: dict, valid: st.SearchStrategy) -> st.SearchStrategy:
    """A third valid requests (they reach the engines), a third valid but for one hostile
    field, a third hostile throughout (random fields, arbitrary JSON)."""
    return st.one_of(
        valid,
        _corrupt(valid, fields),
        st.one_of(st.fixed_dictionaries({}, optional=fields), _json),
    )


def _check(c: httpx.Client, path: str, body) -> int:
    stream = isinstance(body, dict) and body.get("stream") is True
    t0 = time.monotonic()
    if stream:
        with c.stream("POST", path, json=body) as r:
            data = r.read()
    else:
        r = c.post(path, json=body)
        data = r.content
    assert r.status_code < 500, (r.status_code, data[:500], body)
    assert time.monotonic() - t0 < 60
    if r.status_code >= 400:
        err = json.loads(data)["error"]
        assert err["code"] == r.status_code and err["message"], (err, body)
    elif stream:
        assert data.rstrip().endswith(b"data: [DONE]"), (data[-300:], body)
    return r.status_code


FUZZ = settings(max_examples=1000, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))


@pytest.mark.slow
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_fuzzed_requests_never_5xx_or_hang(app, path):
    """1,000 generated requests per endpoint (2,000 in all): 0 x 5xx, 0 hangs, every error
    in OpenAI format, every accepted stream closed with [DONE]; the engines idle after."""
    fields, valid = ((_completion_fields, _valid_completion) if path == "/v1/completions"
                     else (_chat_fields, _valid_chat))
    statuses: list[int] = []
    with _client(app) as c:
        @FUZZ
        @given(_bodies(fields, valid))
        def run(body):
            statuses.append(_check(c, path, body))

        run()
    assert len(statuses) >= 1000
    accepted = statuses.count(200)
    print(f"{path}: {len(statuses)} requests, {accepted} accepted (200), "
          f"{len(statuses) - accepted} refused (4xx)")
    assert accepted >= 200, "the fuzzing must also reach the engines, not only validation"

    def idle() -> bool:
        return all(engine_stats("pd", d)["num_running_reqs"] == 0
                   for d in ("DecodeServer", "PrefillServer"))

    wait_until(idle, 60, what="engines idle after fuzzing")

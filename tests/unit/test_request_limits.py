"""Body size, read timeout, JSON depth and API keys: the front's input guards (no Ray)."""

from __future__ import annotations

import asyncio
import json

import pytest

from app.api_keys import APIKeys
from app.request_limits import RequestRejected, json_depth, parse_json_object, read_limited


async def _chunks(parts, delay: float = 0.0):
    for p in parts:
        if delay:
            await asyncio.sleep(delay)
        yield p


def _read(parts, content_length=None, max_bytes=100, timeout_s=5.0, delay=0.0):
    return asyncio.run(read_limited(_chunks(parts, delay), content_length, max_bytes,
                                    timeout_s))


def test_body_within_limit_is_read_whole():
    assert _read([b"ab", b"cd"], "4") == b"abcd"


def test_declared_or_streamed_oversize_body_is_413():
    with pytest.raises(RequestRejected) as e:
        _read([b"x"], "101")
    assert e.value.status == 413
    with pytest.raises(RequestRejected) as e:  # chunked: no Content-Length, still capped
        _read([b"x" * 60, b"x" * 60])
    assert e.value.status == 413


def test_bad_content_length_is_400():
    with pytest.raises(RequestRejected) as e:
        _read([b"{}"], "12abc")
    assert e.value.status == 400


def test_slow_body_is_408():
    with pytest.raises(RequestRejected) as e:
        _read([b"a"] * 10, timeout_s=0.05, delay=0.02)
    assert e.value.status == 408 and "0.05 s" in e.value.message


def test_json_depth():
    assert json_depth(1) == 0 and json_depth([]) == 1 and json_depth({"a": [1, {"b": []}]}) == 4
    deep: list = []
    for _ in range(10_000):  # iterative: no recursion limit
        deep = [deep]
    assert json_depth(deep) == 10_001
    assert json_depth(deep, stop_after=5) == 6


@pytest.mark.parametrize("depth", [33, 5_000, 100_000])
def test_deep_json_is_400_not_recursion_error(depth):
    body = b'{"a":' + b"[" * depth + b"]" * depth + b"}"
    with pytest.raises(RequestRejected) as e:
        parse_json_object(body, 32)
    assert e.value.status == 400 and "deeper than 32" in e.value.message


def test_json_within_depth_and_non_objects():
    assert parse_json_object(json.dumps({"a": [[1]]}).encode(), 3) == {"a": [[1]]}
    for body, msg in ((b"[1]", "JSON object"), (b"{", "not valid JSON"),
                      (b"\xff\xfe", "not valid JSON")):
        with pytest.raises(RequestRejected, match=msg):
            parse_json_object(body, 32)


def test_api_keys_from_env_and_file(tmp_path, monkeypatch):
    monkeypatch.setenv("KEYS", " k1 , k2,")
    f = tmp_path / "keys"
    f.write_text("# team A\nk3\n\nk4  # rotated 2026-11\n")
    keys = APIKeys.load("KEYS", str(f))
    assert keys.enabled
    for k in ("k1", "k2", "k3", "k4"):
        assert keys.allows(f"Bearer {k}") and keys.allows(f"bearer  {k}")
    for header in (None, "", "Bearer", "Bearer ", "Basic k1", "Bearer k5", "k1", "Bearer k1x"):
        assert not keys.allows(header), header


def test_no_keys_means_open_and_a_bad_file_fails_loudly(tmp_path, monkeypatch):
    monkeypatch.delenv("KEYS", raising=False)
    assert not APIKeys.load("KEYS", None).enabled
    assert APIKeys.load(None, None).allows(None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        APIKeys.load(None, str(tmp_path / "missing"))
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no key"):
        APIKeys.load(None, str(tmp_path / "empty"))

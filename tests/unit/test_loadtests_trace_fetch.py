"""``python -m loadtests traces fetch``: verified downloads into the cache, and trace lookup.

No network: the real ``../shared/traces`` files are served from 127.0.0.1 (``http.server``)
or read from a directory / ``file://`` mirror.
"""

from __future__ import annotations

import functools
import http.server
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtests import traces as traces_mod
from loadtests.cli import build_parser, main
from loadtests.trace_fetch import (
    SOURCES,
    TraceFetchError,
    fetch_traces,
    sha256_file,
    source_url,
)
from loadtests.traces import CACHE_ENV, TRACE_FILES, TRACES_ENV, read_trace, resolve_traces_dir

SHARED = Path(__file__).resolve().parents[3] / "shared" / "traces"
NAMES = [s.name for s in SOURCES.values()]


@pytest.fixture
def shared() -> Path:
    if not all((SHARED / n).is_file() for n in NAMES):
        pytest.skip(f"shared traces not found in {SHARED} (the pinned copies); nothing to serve")
    return SHARED


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def serve() -> Iterator[functools.partial[str]]:
    """``serve(dir)`` -> base URL of an HTTP server on a free 127.0.0.1 port; stopped after."""
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(directory: Path) -> str:
        handler = functools.partial(_QuietHandler, directory=str(directory))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield functools.partial(start)
    for server in servers:
        server.shutdown()
        server.server_close()


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name not in NAMES)


def test_sources_cover_every_trace_file() -> None:
    assert {s.name for s in SOURCES.values()} == set(TRACE_FILES.values())
    assert all(s.url.startswith("https://raw.githubusercontent.com/") for s in SOURCES.values())
    assert source_url(SOURCES["mooncake"], "http://m/x/") == (
        "http://m/x/mooncake_synthetic_trace.jsonl")


def test_pinned_checksums_are_those_of_the_shared_copies(shared: Path) -> None:
    for src in SOURCES.values():
        assert (shared / src.name).stat().st_size == src.size
        assert sha256_file(shared / src.name) == src.sha256, src.name


def test_fetch_over_http_lands_verified_files_then_is_a_noop(
        shared: Path, serve: functools.partial[str], tmp_path: Path) -> None:
    cache = tmp_path / "cache" / "traces"
    base = serve(shared)
    assert fetch_traces(cache, mirror=base) == {n: "downloaded" for n in NAMES}
    for src in SOURCES.values():
        assert sha256_file(cache / src.name) == src.sha256
    assert _leftovers(cache) == []
    mtimes = {n: (cache / n).stat().st_mtime_ns for n in NAMES}
    # second fetch: checksums match, so nothing is downloaded (a dead mirror proves it)
    assert fetch_traces(cache, mirror="http://127.0.0.1:9") == {n: "present" for n in NAMES}
    assert {n: (cache / n).stat().st_mtime_ns for n in NAMES} == mtimes


@pytest.mark.parametrize("corrupt", ["flip", "append", "truncate"])
def test_corrupted_download_is_rejected_and_not_left(
        shared: Path, serve: functools.partial[str], tmp_path: Path, corrupt: str) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    src = SOURCES["azure:code"]
    data = bytearray((shared / src.name).read_bytes())
    if corrupt == "flip":
        data[1000] ^= 1
    elif corrupt == "append":
        data += b"\n"
    else:
        del data[-10:]
    (mirror / src.name).write_bytes(bytes(data))
    cache = tmp_path / "cache"
    with pytest.raises(TraceFetchError, match=r"AzureLLMInferenceTrace_code\.csv from http://"
                                              r".*does not match its pinned checksum"):
        fetch_traces(cache, ["azure:code"], mirror=serve(mirror))
    assert not (cache / src.name).exists()
    assert _leftovers(cache) == []


def test_wrong_cached_file_is_replaced_from_a_directory_mirror(
        shared: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / TRACE_FILES["mooncake"]).write_text("stale\n")
    assert fetch_traces(cache, ["mooncake"], mirror=str(shared)) == {
        TRACE_FILES["mooncake"]: "replaced"}
    assert sha256_file(cache / TRACE_FILES["mooncake"]) == SOURCES["mooncake"].sha256
    assert fetch_traces(cache, ["azure:conv"], mirror=shared.as_uri()) == {
        TRACE_FILES["azure:conv"]: "downloaded"}


def test_failed_download_names_file_url_and_remedy(
        serve: functools.partial[str], tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    base = serve(tmp_path / "empty")
    with pytest.raises(TraceFetchError) as err:
        fetch_traces(tmp_path / "cache", ["mooncake"], mirror=base)
    msg = str(err.value)
    assert f"download of mooncake_synthetic_trace.jsonl from {base}/" in msg
    assert "404" in msg and "--from" in msg and str(tmp_path / "cache") in msg
    assert _leftovers(tmp_path / "cache") == []
    with pytest.raises(ValueError, match="unknown trace"):
        fetch_traces(tmp_path / "cache", ["azure:chat"])


def test_lookup_order_ends_with_the_fetch_cache(
        shared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(cache))
    monkeypatch.delenv(TRACES_ENV, raising=False)
    assert fetch_traces(cache, mirror=str(shared))
    # ../shared/traces exists here, so it wins over the cache
    assert resolve_traces_dir() == SHARED
    # without it (repository and cwd moved somewhere with no ../shared), the cache is used
    (tmp_path / "repo").mkdir()
    monkeypatch.setattr(traces_mod, "repo_root", lambda: tmp_path / "repo")
    monkeypatch.chdir(tmp_path / "repo")
    assert resolve_traces_dir() == cache
    assert len(read_trace(resolve_traces_dir() / TRACE_FILES["azure:code"])) == 8819
    monkeypatch.setenv(TRACES_ENV, str(tmp_path / "env"))
    assert resolve_traces_dir() == tmp_path / "env"
    assert resolve_traces_dir(tmp_path / "flag") == tmp_path / "flag"
    monkeypatch.delenv(TRACES_ENV)
    shutil.rmtree(cache)  # nothing anywhere: the error points at fetch
    with pytest.raises(FileNotFoundError, match="traces fetch"):
        read_trace(resolve_traces_dir() / TRACE_FILES["mooncake"])


def test_cli_traces_fetch(shared: Path, tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "t"
    assert main(["traces", "fetch", "mooncake", "--from", str(shared), "--dir", str(dest)]) == 0
    out = capsys.readouterr().out
    assert "downloaded" in out and "Apache-2.0" in out and "CC-BY" not in out
    assert main(["traces", "fetch", "--from", str(tmp_path / "nowhere"), "--dir",
                 str(dest)]) == 2
    assert [p.name for p in dest.iterdir()] == [TRACE_FILES["mooncake"]]
    # the existing commands parse as before
    args = build_parser().parse_args(["describe", "--workload", "synthetic:n=1"])
    assert args.command == "describe" and args.traces_dir is None

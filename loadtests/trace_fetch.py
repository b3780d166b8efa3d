"""``python -m loadtests traces fetch``: download the public traces into a cache, verified.

For machines without ``../shared/traces``. Every file is pinned by SHA-256 so a replay on any
machine reads byte-identical traffic; the pinned digests are those of the copies in
``../shared/traces``, which were taken from the URLs below. A download is streamed to a
temporary name in the destination and renamed only after its digest matches, so a failed or
corrupted download never leaves a file that the load tests would read. Standard library only.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from loadtests.traces import TRACE_FILES

MIRROR_ENV = "LOADTESTS_TRACES_MIRROR"
CHUNK = 1 << 16

AZURE_BASE = "https://raw.githubusercontent.com/Azure/AzurePublicDataset/master/data"
MOONCAKE_BASE = "https://raw.githubusercontent.com/kvcache-ai/Mooncake/main/FAST25-release/traces"
AZURE_LICENSE = "CC-BY 4.0 (Azure/AzurePublicDataset)"
AZURE_CITE = ('Patel et al., "Splitwise: Efficient Generative LLM Inference Using Phase '
              'Splitting", ISCA 2024')


@dataclass(frozen=True)
class TraceSource:
    """One published trace file: where it comes from, what it must hash to, its licence."""

    key: str  # workload name, as in TRACE_FILES
    url: str
    sha256: str
    size: int
    license: str
    citation: str

    @property
    def name(self) -> str:
        """File name in a traces dir (and in a ``--from`` mirror)."""
        return TRACE_FILES[self.key]


SOURCES: dict[str, TraceSource] = {
    s.key: s
    for s in (
        TraceSource(
            "azure:conv", f"{AZURE_BASE}/AzureLLMInferenceTrace_conv.csv",
            "2f1e5b666d4e3055fdbba98598ce2ec307767b9064e03e2fa46676dbcc7d0bf8", 719188,
            AZURE_LICENSE, AZURE_CITE),
        TraceSource(
            "azure:code", f"{AZURE_BASE}/AzureLLMInferenceTrace_code.csv",
            "54e9a6d2a4bd06ba1e060304b900abbc74cbea53de96506e60fe5bb4f2277fb6", 320117,
            AZURE_LICENSE, AZURE_CITE),
        TraceSource(
            "mooncake", f"{MOONCAKE_BASE}/synthetic_trace.jsonl",
            "bd070915a98fc0ed264d7cfef2ce746002eb3076a695ec31ba2674c0111ec131", 1136313,
            "Apache-2.0 (kvcache-ai/Mooncake)",
            'Qin et al., "Mooncake: Trading More Storage for Less Computation", FAST 2025'),
    )
}

Status = Literal["present", "downloaded", "replaced"]


class TraceFetchError(RuntimeError):
    """A trace could not be downloaded or did not match its pinned checksum."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def source_url(src: TraceSource, mirror: str | None = None) -> str:
    """The published URL, or ``mirror/<file name>``; a mirror may be a URL (http, https,
    file) or a local directory holding the files under their traces-dir names."""
    if not mirror:
        return src.url
    if "://" not in mirror:
        return (Path(mirror).expanduser().resolve() / src.name).as_uri()
    return f"{mirror.rstrip('/')}/{src.name}"


def _copy_verified(resp: BinaryIO, out: BinaryIO, src: TraceSource, url: str) -> None:
    """Stream ``resp`` into ``out``; raise unless it is exactly the pinned bytes."""
    digest, size = hashlib.sha256(), 0
    while chunk := resp.read(CHUNK):
        size += len(chunk)
        if size > src.size:  # a wrong file (e.g. an HTML error page that grew); stop early
            break
        digest.update(chunk)
        out.write(chunk)
    got = (f"more than {src.size} bytes" if size > src.size
           else f"{size} bytes, sha256 {digest.hexdigest()}")
    if size != src.size or digest.hexdigest() != src.sha256:
        raise TraceFetchError(
            f"{src.name} from {url} does not match its pinned checksum (got {got}; expected "
            f"{src.size} bytes, sha256 {src.sha256}); the source changed or is not the original "
            f"file: pass --from <mirror> holding the original, or copy it into --dir")


def fetch_one(src: TraceSource, dest: Path, mirror: str | None = None,
              timeout: float = 60.0) -> Status:
    """Make ``dest/src.name`` the pinned file: no-op if it already hashes right, else download
    to a temporary name beside it and rename after verification (atomic on one file system)."""
    target = dest / src.name
    existed = target.is_file()
    if existed and sha256_file(target) == src.sha256:
        return "present"
    url = source_url(src, mirror)
    hint = f"pass --from <mirror URL or directory> or copy the file into {dest}"
    try:
        dest.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{src.name}.", suffix=".part", dir=dest)
    except OSError as exc:
        raise TraceFetchError(f"cannot write into {dest}: {exc}; pass --dir DIR") from exc
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:
                    _copy_verified(resp, out, src, url)
            except (OSError, ValueError, http.client.HTTPException) as exc:
                # URLError/HTTPError, timeouts, truncated responses, malformed URLs
                raise TraceFetchError(
                    f"download of {src.name} from {url} failed: {exc}; {hint}") from exc
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the traces are public
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return "replaced" if existed else "downloaded"


def fetch_traces(dest: Path, keys: Iterable[str] | None = None, mirror: str | None = None,
                 timeout: float = 60.0) -> dict[str, Status]:
    """Fetch ``keys`` (default: all of :data:`SOURCES`) into ``dest``; file name -> status.
    ``mirror`` defaults to ``$LOADTESTS_TRACES_MIRROR``."""
    mirror = mirror or os.environ.get(MIRROR_ENV) or None
    wanted = list(keys) if keys else list(SOURCES)
    unknown = [k for k in wanted if k not in SOURCES]
    if unknown:
        raise ValueError(f"unknown trace(s) {unknown}; choose from {sorted(SOURCES)}")
    return {SOURCES[k].name: fetch_one(SOURCES[k], dest, mirror, timeout) for k in wanted}


"""Trace parsing (Azure CSV, Mooncake JSONL) and trace-file lookup.

Parsers take lines, not paths, so they are tested on hand-written rows; only
:func:`read_trace` and :func:`resolve_traces_dir` touch the file system. Traces are never
copied into the repository: they are found in ``../shared/traces`` beside it by default, else
in the cache that ``python -m loadtests traces fetch`` fills (``loadtests/trace_fetch.py``).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

TRACE_FILES = {
    "azure:conv": "AzureLLMInferenceTrace_conv.csv",
    "azure:code": "AzureLLMInferenceTrace_code.csv",
    "mooncake": "mooncake_synthetic_trace.jsonl",
}
TRACES_ENV = "LOADTESTS_TRACES_DIR"
CACHE_ENV = "LOADTESTS_TRACES_CACHE"
FETCH_HINT = "run `python -m loadtests traces fetch`, pass --traces-dir or set $" + TRACES_ENV


@dataclass(frozen=True)
class TraceRecord:
    """One trace row: arrival (seconds from the trace's first row), lengths, prefix blocks."""

    timestamp: float
    input_len: int
    output_len: int
    hash_ids: tuple[int, ...] = ()


def parse_azure_csv(lines: Iterable[str]) -> list[TraceRecord]:
    """Parse ``TIMESTAMP,ContextTokens,GeneratedTokens`` rows; times become seconds since the
    first row (the file's absolute dates carry no information for a replay)."""
    reader = csv.DictReader(lines)
    missing = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} - set(reader.fieldnames or ())
    if missing:
        raise ValueError(f"Azure trace lacks columns {sorted(missing)}")
    rows = [
        (datetime.fromisoformat(r["TIMESTAMP"].strip()), int(r["ContextTokens"]),
         int(r["GeneratedTokens"]))
        for r in reader
    ]
    if not rows:
        return []
    t0 = min(t for t, _, _ in rows)
    out = [TraceRecord((t - t0).total_seconds(), i, o) for t, i, o in rows]
    out.sort(key=lambda r: r.timestamp)  # stable: equal times keep file order
    return out


def parse_mooncake_jsonl(lines: Iterable[str]) -> list[TraceRecord]:
    """Parse Mooncake rows ``{"timestamp": ms, "input_length", "output_length", "hash_ids"}``."""
    records = []
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
            records.append(
                TraceRecord(
                    timestamp=float(row["timestamp"]) / 1000.0,
                    input_len=int(row["input_length"]),
                    output_len=int(row["output_length"]),
                    hash_ids=tuple(int(h) for h in row.get("hash_ids", ())),
                )
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"Mooncake trace line {n}: {exc}") from exc
    if records:
        t0 = min(r.timestamp for r in records)
        records = [
            TraceRecord(r.timestamp - t0, r.input_len, r.output_len, r.hash_ids) for r in records
        ]
        records.sort(key=lambda r: r.timestamp)
    return records


def select_rows(
    records: list[TraceRecord], row_slice: tuple[int | None, int | None] | None, n: int | None
) -> list[TraceRecord]:
    """Apply ``slice`` then ``n``, and rebase times so the first kept row arrives at 0."""
    rows = records[slice(*row_slice)] if row_slice else list(records)
    if n is not None:
        rows = rows[:n]
    if not rows:
        return []
    t0 = rows[0].timestamp
    return [TraceRecord(r.timestamp - t0, r.input_len, r.output_len, r.hash_ids) for r in rows]


def repo_root() -> Path:
    """The repository holding this package (``loadtests/`` sits at its top level)."""
    return Path(__file__).resolve().parents[1]


def default_cache_dir() -> Path:
    """Where ``traces fetch`` puts downloads: ``$LOADTESTS_TRACES_CACHE``, else
    ``$XDG_CACHE_HOME/pd-serve/traces``, else ``~/.cache/pd-serve/traces`` (outside the repo)."""
    if env := os.environ.get(CACHE_ENV):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pd-serve" / "traces"


def resolve_traces_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """``--traces-dir``, else ``$LOADTESTS_TRACES_DIR``, else ``../shared/traces`` beside the
    repository root or the current directory, else the fetch cache (:func:`default_cache_dir`).
    If none exists, the cache dir is returned so the "not found" error points where fetch goes."""
    if override:
        return Path(override)
    if env := os.environ.get(TRACES_ENV):
        return Path(env)
    candidates = [repo_root().parent / "shared" / "traces", Path.cwd().parent / "shared" / "traces"]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    return default_cache_dir()


def trace_path(key: str, path: str | None, traces_dir: Path) -> Path:
    """Explicit ``path=`` (relative paths are tried as given, then in the traces dir)."""
    if path:
        given = Path(path)
        if given.is_file() or given.is_absolute():
            return given
        return traces_dir / given
    return traces_dir / TRACE_FILES[key]


def read_trace(path: Path) -> list[TraceRecord]:
    """Read an Azure CSV or Mooncake JSONL file, chosen by suffix."""
    if not path.is_file():
        raise FileNotFoundError(f"trace {path} not found; {FETCH_HINT}")
    with path.open(newline="") as fh:
        if path.suffix == ".csv":
            return parse_azure_csv(fh)
        return parse_mooncake_jsonl(fh)

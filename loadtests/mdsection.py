"""Replace one marked section of a shared Markdown file, leaving the rest byte for byte.

Several scripts write to ``docs/BENCHMARKS.md``; each owns only the text between its own
``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` markers.
"""

from __future__ import annotations

from pathlib import Path


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def replace_section(text: str, name: str, body: str) -> str:
    """``text`` with the section ``name`` set to ``body`` (appended if the markers are absent).

    Raises ``ValueError`` on a half-present or misordered marker pair rather than guessing
    which part of someone else's text to overwrite.
    """
    start, end = markers(name)
    i, j = text.find(start), text.find(end)
    block = f"{start}\n{body.strip()}\n{end}"
    if i == -1 and j == -1:
        trailing_newlines = len(text) - len(text.rstrip("\n"))
        sep = "\n" * max(0, 2 - trailing_newlines) if text else ""
        return f"{text}{sep}{block}\n"
    if i == -1 or j == -1 or j < i or text.count(start) > 1 or text.count(end) > 1:
        raise ValueError(f"markers for {name!r} are incomplete, repeated or out of order")
    return text[:i] + block + text[j + len(end):]


def update_file(path: Path, name: str, body: str, title: str = "# Benchmarks") -> None:
    """Write ``body`` into section ``name`` of ``path``, creating the file if needed."""
    text = path.read_text() if path.exists() else f"{title}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(replace_section(text, name, body))

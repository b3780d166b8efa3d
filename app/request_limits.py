"""Limits on what a client may send before any engine is involved.

A body is read only up to ``max_bytes`` and within ``timeout_s`` (a slow or endless upload
holds a coroutine, never engine capacity), and parsed JSON may nest only ``max_depth`` deep:
Python's decoder recurses, so a 100,000-deep body otherwise ends in a RecursionError (500).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any


class RequestRejected(Exception):
    """Client input refused: ``status`` and ``message`` go to the OpenAI error body."""

    def __init__(self, message: str, status: int = 400, err_type: str = "BadRequestError"):
        super().__init__(message)
        self.message, self.status, self.err_type = message, status, err_type


async def read_limited(chunks: AsyncIterator[bytes], content_length: str | None,
                       max_bytes: int, timeout_s: float) -> bytes:
    """The whole body, or :class:`RequestRejected` (413 too large, 408 too slow)."""
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise RequestRejected(f"invalid Content-Length {content_length[:32]!r}") from None
        if declared > max_bytes:
            raise _too_large(max_bytes)

    async def read() -> bytes:
        parts, total = [], 0
        async for chunk in chunks:
            total += len(chunk)
            if total > max_bytes:
                raise _too_large(max_bytes)
            parts.append(chunk)
        return b"".join(parts)

    try:
        return await asyncio.wait_for(read(), timeout_s)
    except TimeoutError:
        raise RequestRejected(f"request body not received within {timeout_s:g} s", 408,
                              "RequestTimeout") from None


def _too_large(max_bytes: int) -> RequestRejected:
    return RequestRejected(f"request body larger than {max_bytes} bytes", 413,
                           "RequestTooLarge")


def parse_json_object(body: bytes, max_depth: int) -> dict[str, Any]:
    """The body as a JSON object nested at most ``max_depth`` deep."""
    try:
        value = json.loads(body)
    except RecursionError:
        raise RequestRejected(f"request body nests deeper than {max_depth} levels") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestRejected(f"request body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise RequestRejected("request body must be a JSON object")
    if json_depth(value, max_depth) > max_depth:
        raise RequestRejected(f"request body nests deeper than {max_depth} levels")
    return value


def json_depth(value: Any, stop_after: int | None = None) -> int:
    """Nesting depth of decoded JSON (a scalar is 0, ``[]`` 1); iterative, and it stops
    counting once past ``stop_after``."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, depth)
        if stop_after is not None and deepest > stop_after:
            return deepest
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return deepest

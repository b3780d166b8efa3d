"""What an engine replica answers: a :class:`Head` first, then SSE strings when streaming.

Sending status and body kind before any chunk lets the ingress choose the HTTP status (a 400
for a prompt that is too long) before it commits to a streaming 200.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

KIND_JSON = "json"  # body is the whole OpenAI response
KIND_ERROR = "error"  # body is an OpenAI error; status is its HTTP code
KIND_STREAM = "stream"  # SSE "data: ..." strings follow


@dataclass(frozen=True)
class Head:
    kind: str
    status: int = 200
    body: dict[str, Any] | None = None

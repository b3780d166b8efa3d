"""What an engine replica answers: a :class:`Head` first, then SSE strings when streaming.

Sending status and body kind before any chunk lets the ingress choose the HTTP status (a 400
for a prompt that is too long) before it commits to a streaming 200.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

KIND_JSON = "json"  # body is the whole OpenAI response
KIND_ERROR = "error"  # body is an OpenAI error; status is its HTTP code
KIND_STREAM = "stream"  # SSE "data: ..." strings follow
# Before a pushed leg's whole answer: the engine put out its token 1, so its KV is in and the
# front's push wait is over (the answer itself comes at the end, as another Head).
KIND_STARTED = "started"


@dataclass(frozen=True)
class Head:
    kind: str
    status: int = 200
    body: dict[str, Any] | None = None


async def stream_after_head(
    chunks: AsyncIterator[str], on_abandoned: Callable[[], Awaitable[None]]
) -> AsyncIterator[Head | str]:
    """The stream Head, then ``chunks``.

    vLLM adds a streaming request to its engine only when the first chunk is asked for. A
    consumer that leaves after the Head (client gone between prefill and decode) never starts
    ``chunks``, so the engine never hears of the request and cannot free what it reserved
    elsewhere (the prefill engine's blocks): ``on_abandoned`` does that instead.
    """
    try:
        yield Head(KIND_STREAM)
    except BaseException:  # GeneratorExit from aclose(), or a cancellation
        await on_abandoned()
        raise
    async for chunk in chunks:
        yield chunk

"""The stream Head protocol: an abandoned stream must release what the engine never saw."""

from __future__ import annotations

import asyncio
import gc

from app.engine_protocol import KIND_STREAM, Head, stream_after_head


class Chunks:
    """An async iterator that records whether anyone asked it for a chunk."""

    def __init__(self, items):
        self.items = list(items)
        self.started = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        self.started = True
        if not self.items:
            raise StopAsyncIteration
        return self.items.pop(0)


def _recorder():
    calls = []

    async def on_abandoned():
        calls.append(1)

    return calls, on_abandoned


async def test_closed_after_head_releases_and_never_starts_the_engine_stream():
    chunks = Chunks(["data: a\n\n"])
    calls, on_abandoned = _recorder()
    stream = stream_after_head(chunks, on_abandoned)
    assert await anext(stream) == Head(KIND_STREAM)
    await stream.aclose()
    assert calls == [1]
    assert not chunks.started


async def test_dropped_after_head_releases_through_the_finalizer():
    chunks = Chunks(["data: a\n\n"])
    calls, on_abandoned = _recorder()
    stream = stream_after_head(chunks, on_abandoned)
    await anext(stream)
    del stream
    gc.collect()
    for _ in range(3):  # asyncio runs the generator's aclose() as a task
        await asyncio.sleep(0)
    assert calls == [1]


async def test_consumed_stream_does_not_release():
    chunks = Chunks(["data: a\n\n", "data: b\n\n"])
    calls, on_abandoned = _recorder()
    items = [item async for item in stream_after_head(chunks, on_abandoned)]
    assert items == [Head(KIND_STREAM), "data: a\n\n", "data: b\n\n"]
    assert calls == []


async def test_closed_mid_stream_leaves_cleanup_to_the_engine():
    """Once the first chunk was asked for, the engine has the request and aborts it itself."""
    chunks = Chunks(["data: a\n\n", "data: b\n\n"])
    calls, on_abandoned = _recorder()
    stream = stream_after_head(chunks, on_abandoned)
    await anext(stream)
    assert await anext(stream) == "data: a\n\n"
    await stream.aclose()
    assert calls == []

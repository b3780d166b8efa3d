"""Drive one load point: release requests on schedule (open loop) or keep N in flight
(closed loop), and collect one record per request whatever happens to it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from loadtests.client import CompletionsClient
from loadtests.metrics import RequestRecord
from loadtests.workloads import Request


@dataclass
class RunOutcome:
    records: list[RequestRecord]
    duration: float  # first send -> last response, seconds


def _record(request: Request, scheduled: float | None) -> RequestRecord:
    return RequestRecord(
        request_id=request.request_id,
        prompt_len=request.prompt_len,
        output_len_requested=request.output_len,
        scheduled_time=scheduled,
    )


async def run_load(
    client: CompletionsClient,
    requests: Sequence[Request],
    offsets: Sequence[float] | None,
    *,
    concurrency: int | None = None,
    max_concurrency: int | None = None,
    on_done: Callable[[RequestRecord], None] | None = None,
) -> RunOutcome:
    """Open loop when ``offsets`` is given (optionally capped at ``max_concurrency`` in
    flight, the wait recorded as ``queue_time``); closed loop at ``concurrency`` otherwise.

    Records come back in request order, one per request.
    """
    t0 = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - t0

    async def send(request: Request, record: RequestRecord) -> None:
        await client.stream(request, record, clock)
        if on_done is not None:
            on_done(record)

    if offsets is not None:
        if len(offsets) != len(requests):
            raise ValueError("one offset per request")
        records = [_record(r, off) for r, off in zip(requests, offsets, strict=True)]
        slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None

        async def open_send(request: Request, record: RequestRecord) -> None:
            if slots is None:
                await send(request, record)
                return
            waited = clock()
            async with slots:
                record.queue_time = clock() - waited
                await send(request, record)

        tasks = []
        for request, record, offset in zip(requests, records, offsets, strict=True):
            delay = offset - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(open_send(request, record)))
        await asyncio.gather(*tasks)
    else:
        if not concurrency:
            raise ValueError("closed loop needs a concurrency")
        records = [_record(r, None) for r in requests]
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(len(requests)):
            queue.put_nowait(i)

        async def worker() -> None:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                await send(requests[i], records[i])

        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(requests)))))
    return RunOutcome(records, clock())

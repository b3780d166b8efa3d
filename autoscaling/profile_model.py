"""Capacity profile of one engine replica: the curves every scaling decision and the simulator read.

A profile is a JSON file (``autoscaling/profiles/*.json``) written by ``python -m
autoscaling.profile`` from a running engine (CPU) or converted from published GPU perf tables
(``python -m autoscaling.profile aiconfigurator``). It holds measured points only; the
latency functions below interpolate them, so the policies never invent capacity.

- prefill: latency of one engine step that computes ``tokens`` prompt tokens (a lone prompt,
  or a batch of prompts whose prompt tokens sum to ``tokens``: chunked prefill makes the two
  cost alike on one engine);
- decode: inter-token latency with ``batch`` running sequences of ``context`` tokens each;
- kv: bytes of KV per token, KV capacity per replica, and the time to move ``bytes`` between
  replicas (NIXL), fitted as ``fixed_ms + bytes / bandwidth``;
- startup_s: time from "replica requested" to "replica serving";
- pd_decode (optional): how decode steps slow down in the P/D layout where prefill and decode
  share a host (CPU), measured.
"""

from __future__ import annotations

import bisect
import json
import statistics
from collections.abc import Callable
from functools import cached_property
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

PROFILE_DIR = Path(__file__).parent / "profiles"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PrefillPoint(_Strict):
    tokens: int = Field(gt=0, description="Prompt tokens computed in the step (batch sum).")
    batch: int = Field(1, ge=1, description="Prompts in the step.")
    ms: float = Field(gt=0, description="Step latency.")


class DecodePoint(_Strict):
    batch: int = Field(ge=1, description="Running sequences.")
    context: int = Field(ge=1, description="Tokens of context per sequence.")
    itl_ms: float = Field(gt=0, description="Inter-token latency at that batch and context.")


class TransferPoint(_Strict):
    bytes: int = Field(gt=0)
    ms: float = Field(gt=0)


class KVProfile(_Strict):
    bytes_per_token: int = Field(gt=0, description="KV bytes per token (all layers).")
    capacity_tokens: int = Field(gt=0, description="Tokens of KV one replica holds.")
    transfer: list[TransferPoint] = Field(
        default_factory=list, description="KV hand-offs between a prefill and a decode "
        "replica: bytes moved and the time it took (measured, or from a link rate stated in "
        "the profile's notes).")


class PDDecodePoint(_Strict):
    batch: int = Field(ge=1)
    context: int = Field(ge=1, description="Mean context per sequence over the window.")
    idle_ms: float = Field(gt=0, description="ITL in the P/D layout, the prefill engine idle.")
    busy_ms: float = Field(gt=0, description="ITL in the P/D layout while the prefill engine "
                           "computes long prompts back to back (their KV reads included).")


class PrefillTTFTPoint(_Strict):
    prompt: int = Field(ge=1)
    idle_ms: float = Field(gt=0, description="TTFT in the P/D layout, decode idle.")
    busy_ms: float = Field(gt=0, description="TTFT while the decode engine decodes streams.")


class PDDecode(_Strict):
    """How decoding in the P/D layout differs from the aggregated-layout ``decode`` points.

    Measured where both engines share one host (CPU): the decode engine's KV connector and
    the prefill engine's compute (memory bandwidth, caches, the KV reads it triggers) slow
    decode steps. Profiles without it (separate GPUs) decode at ``itl_ms`` in both layouts."""

    points: list[PDDecodePoint] = Field(min_length=1)
    idle_factor: float = Field(gt=0, description="median idle_ms / itl_ms(batch, context)")
    busy_factor: float = Field(gt=0, description="median busy_ms / idle_ms")
    prefill_slowdown: float = Field(
        1.0, gt=0, description="The converse: median TTFT of a lone prompt while the decode "
        "engine decodes / its TTFT with decode idle; applied to prefill steps.")
    prefill_points: list[PrefillTTFTPoint] = Field(default_factory=list)


class Profile(_Strict):
    name: str
    model: str
    hardware: str
    engine: str
    source: str = Field(description="Where the numbers come from: the command and date of a "
                        "measurement, or the published table they were converted from.")
    max_num_batched_tokens: int = Field(gt=0, description="Prompt tokens one engine step takes.")
    max_num_seqs: int = Field(gt=0)
    startup_s: float = Field(gt=0)
    prefill: list[PrefillPoint] = Field(min_length=2)
    decode: list[DecodePoint] = Field(min_length=2)
    kv: KVProfile
    pd_decode: PDDecode | None = None
    notes: list[str] = Field(default_factory=list)

    @field_validator("prefill")
    @classmethod
    def _distinct_tokens(cls, points: list[PrefillPoint]) -> list[PrefillPoint]:
        if len({p.tokens for p in points}) < 2:
            raise ValueError("prefill needs points at two or more token counts")
        return points

    # --- loading ------------------------------------------------------------------------------

    @classmethod
    def load(cls, name_or_path: str | Path) -> Profile:
        """A path to a JSON file, or the name of a committed profile (``cpu-tiny-llama``)."""
        path = Path(name_or_path)
        if not path.exists():
            path = PROFILE_DIR / f"{name_or_path}.json"
        if not path.exists():
            known = sorted(p.stem for p in PROFILE_DIR.glob("*.json"))
            raise FileNotFoundError(f"no profile {name_or_path!r}; committed profiles: {known}")
        return cls.model_validate(json.loads(path.read_text()))

    def dump(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.model_dump(), indent=1) + "\n")

    # --- prefill ------------------------------------------------------------------------------

    @cached_property
    def _prefill_curve(self) -> tuple[list[float], list[float]]:
        """Lone-prompt points: a batch of short prompts costs less than one prompt of the same
        total on CPU (measured: 1024 tokens 968 ms alone, ~857 ms as 4-8 prompts), so mixing
        them made single-prompt TTFT optimistic. Batched points set the throughput instead."""
        lone = [p for p in self.prefill if p.batch == 1]
        points = lone if len({p.tokens for p in lone}) >= 2 else self.prefill
        by_tokens: dict[int, list[float]] = {}
        for p in points:
            by_tokens.setdefault(p.tokens, []).append(p.ms)
        xs = sorted(by_tokens)
        return [float(x) for x in xs], [sum(by_tokens[x]) / len(by_tokens[x]) for x in xs]

    def prefill_ms(self, tokens: float) -> float:
        """Latency of a step computing ``tokens`` prompt tokens (longer prompts take several
        steps of ``max_num_batched_tokens``)."""
        if tokens <= 0:
            return 0.0
        full, rest = divmod(tokens, self.max_num_batched_tokens)
        ms = full * _interp(*self._prefill_curve, self.max_num_batched_tokens)
        return ms + (_interp(*self._prefill_curve, rest) if rest > 0 else 0.0)

    @cached_property
    def prefill_tokens_per_s(self) -> float:
        """Saturated prefill throughput: full steps of ``max_num_batched_tokens``, or batching
        if it did better (the median of the batched points at their largest token count: one
        lucky sample must not set the capacity)."""
        full = self.max_num_batched_tokens / self.prefill_ms(self.max_num_batched_tokens) * 1e3
        batched = [p for p in self.prefill if p.batch > 1]
        if not batched:
            return full
        top = max(p.tokens for p in batched)
        ms = sorted(p.ms for p in batched if p.tokens == top)
        return max(full, top / ms[len(ms) // 2] * 1e3)

    # --- decode -------------------------------------------------------------------------------

    @cached_property
    def _decode_fit(self) -> Callable[[float, float], float]:
        return itl_fit(self.decode)

    def itl_ms(self, batch: float, context: float) -> float:
        return self._decode_fit(batch, context)

    def pd_itl_ms(self, batch: float, context: float, prefill_busy: float) -> float:
        """ITL of a decode replica in the P/D layout while a ``prefill_busy`` fraction (0-1)
        of the prefill engines sharing its host compute."""
        base = self.itl_ms(batch, context)
        f = self.pd_decode
        if f is None:
            return base
        return base * f.idle_factor * (1.0 + (f.busy_factor - 1.0) * prefill_busy)

    @cached_property
    def attention_t0(self) -> float | None:
        """How fast attention's share of a lone prompt's step grows with its length:
        share(T) = T / (T + t0). A batch of k prompts of T/k tokens then costs
        ``prefill_ms(T) x (1 - share(T) x (1 - 1/k))``, since attention grows with each
        prompt's own length, the rest with the step's tokens. t0 is the median over the
        batched points of the value that reproduces each (cpu-small-llama: 2040 tokens cost
        2193 ms alone, 1595 ms as 4 prompts; H100 tables: 8192 tokens 200 ms alone, 181 ms
        as 4). None without batched points that are cheaper than lone ones."""
        estimates = []
        for p in self.prefill:
            if p.batch <= 1:
                continue
            share = (1.0 - p.ms / self.prefill_ms(p.tokens)) / (1.0 - 1.0 / p.batch)
            if 0.0 < share < 1.0:
                estimates.append(p.tokens * (1.0 - share) / share)
        return statistics.median(estimates) if estimates else None

    def prefill_step_ms(self, chunks: list[tuple[float, float]]) -> float:
        """One step computing these prompt chunks, each (tokens in this step, tokens of its
        prompt computed before): the lone-prompt latency at the step's total, with its
        attention share (:attr:`attention_t0`) scaled by the chunks' attention work,
        sum of chunk x (before + chunk / 2), against one fresh prompt's (total^2 / 2): less
        for several short prompts, more for a long prompt's later chunk."""
        tokens = sum(q for q, _ in chunks)
        base = self.prefill_ms(tokens)
        t0 = self.attention_t0
        if t0 is None or tokens <= 0:
            return base
        share = tokens / (tokens + t0)
        work = sum(q * (done + q / 2.0) for q, done in chunks) / (tokens * tokens / 2.0)
        return base * (1.0 - share + share * work)

    def pd_prefill_ms(self, tokens: float | list[tuple[float, float]],
                      decode_busy: float) -> float:
        """A prefill step (``tokens``, or its chunks as in :meth:`prefill_step_ms`) in the P/D
        layout while a ``decode_busy`` share (0-1) of the decode engines sharing its host
        decode."""
        base = self.prefill_step_ms(tokens if isinstance(tokens, list) else [(tokens, 0.0)])
        f = self.pd_decode
        if f is None:
            return base
        return base * (1.0 + (f.prefill_slowdown - 1.0) * decode_busy)

    def max_decode_batch(self, context: float, itl_slo_ms: float) -> int:
        """Largest batch whose ITL at ``context`` stays within the SLO (at least 1)."""
        lo, hi = 1, self.max_num_seqs
        if self.itl_ms(hi, context) <= itl_slo_ms:
            return hi
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.itl_ms(mid, context) <= itl_slo_ms:
                lo = mid
            else:
                hi = mid - 1
        return lo

    # --- KV transfer --------------------------------------------------------------------------

    @cached_property
    def _transfer_fit(self) -> tuple[float, float]:
        """(fixed ms, ms per byte) from the measured hand-offs; 0 cost without any."""
        pts = self.kv.transfer
        if not pts:
            return 0.0, 0.0
        if len({p.bytes for p in pts}) < 2:
            p = pts[0]
            return 0.0, p.ms / p.bytes
        xs, ys = [float(p.bytes) for p in pts], [p.ms for p in pts]
        n, mx, my = len(xs), sum(xs) / len(xs), sum(ys) / len(ys)
        sxx = sum((x - mx) ** 2 for x in xs)
        slope = max(sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx, 0.0)
        return max(my - slope * mx, 0.0), slope if n else 0.0

    def transfer_ms(self, tokens: float) -> float:
        if tokens <= 0:
            return 0.0
        fixed, per_byte = self._transfer_fit
        return fixed + per_byte * tokens * self.kv.bytes_per_token


def itl_fit(points: list[DecodePoint]) -> Callable[[float, float], float]:
    """ITL(batch, context) by least squares ``a + b*batch + c*batch*context`` (weights, then
    attention)."""
    rows = [(1.0, p.batch, p.batch * p.context) for p in points]
    a, b, c = _lstsq3(rows, [p.itl_ms for p in points])
    # A noisy fit must not predict faster decoding for bigger batches.
    b, c = max(b, 0.0), max(c, 0.0)

    def itl(batch: float, context: float) -> float:
        return max(a + b * max(batch, 1) + c * max(batch, 1) * max(context, 1), 1e-3)

    return itl


def _interp(xs: list[float], ys: list[float], x: float) -> float:
    """Piecewise linear; beyond the ends, the slope of the nearest segment (never below 0)."""
    i = bisect.bisect_left(xs, x)
    if i == 0:
        i = 1
    elif i >= len(xs):
        i = len(xs) - 1
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    y = y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    if x < xs[0]:  # below the smallest point: scale down proportionally, not linearly to < 0
        y = ys[0] * x / xs[0] if xs[0] > 0 else ys[0]
    return max(y, 1e-3)


def _lstsq3(rows: list[tuple[float, float, float]], ys: list[float]) -> tuple[float, float, float]:
    """Normal equations for three unknowns (no numpy needed in the policy process)."""
    m = [[sum(r[i] * r[j] for r in rows) for j in range(3)] for i in range(3)]
    v = [sum(r[i] * y for r, y in zip(rows, ys, strict=True)) for i in range(3)]
    # Tiny ridge keeps a degenerate grid (one context only) solvable.
    for i in range(3):
        m[i][i] += 1e-9 * (m[i][i] or 1.0)
    return tuple(_solve3(m, v))  # type: ignore[return-value]


def _solve3(m: list[list[float]], v: list[float]) -> list[float]:
    a = [row[:] + [v[i]] for i, row in enumerate(m)]
    for col in range(3):
        piv = max(range(col, 3), key=lambda r: abs(a[r][col]))
        a[col], a[piv] = a[piv], a[col]
        if abs(a[col][col]) < 1e-300:
            continue
        for r in range(3):
            if r != col:
                f = a[r][col] / a[col][col]
                for k in range(col, 4):
                    a[r][k] -= f * a[col][k]
    return [a[i][3] / a[i][i] if abs(a[i][i]) > 1e-300 else 0.0 for i in range(3)]

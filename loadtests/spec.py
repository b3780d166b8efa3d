"""Workload and arrival specifications, from compact strings or YAML/JSON files.

A spec says *what* to send (prompt/output lengths, trace rows, prefix sharing); the arrival
spec says *when*. Keeping them apart lets one workload be replayed at many rates, which is
what a DistServe-style goodput sweep needs. Grammar (documented in ``loadtests/README.md``)::

    synthetic:n=100,input=1000,output=uniform:32:128,prefixes=4,prefix_len=512
    azure:conv,slice=0:200,input_scale=0.25,max_output=128
    mooncake:block=16,slice=0:100,max_input=1500,time_scale=2
    poisson | gamma:cv=2 | gamma:burstiness=0.25 | trace | closed:concurrency=4
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator


class LengthDist(BaseModel):
    """A token-length distribution: ``N``, ``uniform:LO:HI`` (inclusive) or ``normal:MEAN:STD``.

    Samples are integers >= 1 so every request asks for at least one token.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["fixed", "uniform", "normal"] = "fixed"
    a: float
    b: float = 0.0

    @model_validator(mode="before")
    @classmethod
    def _from_scalar(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("length must be a number or a distribution string")
        if isinstance(value, int | float):
            return {"kind": "fixed", "a": value}
        if isinstance(value, str):
            parts = value.strip().split(":")
            if len(parts) == 1:
                return {"kind": "fixed", "a": float(parts[0])}
            kind, *args = parts
            if kind == "fixed" and len(args) == 1:
                return {"kind": "fixed", "a": float(args[0])}
            if kind in ("uniform", "normal") and len(args) == 2:
                return {"kind": kind, "a": float(args[0]), "b": float(args[1])}
            raise ValueError(f"bad length distribution {value!r}: use N, uniform:LO:HI, normal:M:S")
        return value

    @model_validator(mode="after")
    def _check(self) -> LengthDist:
        if self.kind == "fixed" and (self.a < 0 or self.a != int(self.a)):
            raise ValueError("fixed length must be a non-negative integer")
        if self.kind == "uniform" and not (0 <= self.a <= self.b):
            raise ValueError("uniform:LO:HI needs 0 <= LO <= HI")
        if self.kind == "normal" and self.b < 0:
            raise ValueError("normal:MEAN:STD needs STD >= 0")
        return self

    def sample(self, rng: random.Random, minimum: int = 1) -> int:
        """Draw one length (>= ``minimum``) from ``rng``."""
        if self.kind == "fixed":
            value = int(self.a)
        elif self.kind == "uniform":
            value = rng.randint(int(self.a), int(self.b))
        else:
            value = round(rng.gauss(self.a, self.b))
        return max(minimum, value)

    @property
    def mean(self) -> float:
        return (self.a + self.b) / 2 if self.kind == "uniform" else self.a

    def __str__(self) -> str:
        if self.kind == "fixed":
            return str(int(self.a))
        return f"{self.kind}:{self.a:g}:{self.b:g}"


def _parse_slice(value: Any) -> Any:
    """``"10:20"`` / ``":100"`` / ``"5:"`` / ``[10, 20]`` -> ``(start, stop)``, Python-style."""
    if value is None or isinstance(value, tuple):
        return value
    if isinstance(value, list):
        return tuple(value)
    if isinstance(value, str):
        if ":" not in value:
            raise ValueError(f"bad slice {value!r}: use START:STOP")
        start, stop = value.split(":", 1)
        return (int(start) if start.strip() else None, int(stop) if stop.strip() else None)
    raise ValueError(f"bad slice {value!r}")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    _always_shown: ClassVar[tuple[str, ...]] = ()

    def compact(self) -> str:
        """The compact string form of this spec (non-default fields only)."""
        fields = self.model_dump(exclude_defaults=True, exclude={"kind"})
        always = {k: getattr(self, k) for k in self._always_shown}
        fields = {**always, **fields} if always else fields
        parts = []
        for key, value in fields.items():
            if key == "slice":
                start, stop = value
                value = f"{'' if start is None else start}:{'' if stop is None else stop}"
            elif isinstance(value, dict | LengthDist):
                value = str(LengthDist.model_validate(value))
            parts.append(f"{key}={value}")
        kind = self.kind  # type: ignore[attr-defined]
        return f"{kind}:{','.join(parts)}" if parts else kind


class SyntheticSpec(_Spec):
    """Random token prompts; with ``prefixes > 0`` each prompt is one of ``prefixes`` shared
    prefixes of ``prefix_len`` tokens plus a unique suffix of ``suffix_len`` tokens (default:
    ``input - prefix_len``), so prefix caching has something real to reuse."""

    _always_shown: ClassVar[tuple[str, ...]] = ("n", "input", "output")

    kind: Literal["synthetic"] = "synthetic"
    n: int = Field(100, ge=1)
    input: LengthDist = LengthDist(a=1000)
    output: LengthDist = LengthDist(a=64)
    prefixes: int = Field(0, ge=0)
    prefix_len: int = Field(0, ge=0)
    suffix_len: LengthDist | None = None

    @model_validator(mode="after")
    def _check(self) -> SyntheticSpec:
        if self.prefixes and not self.prefix_len:
            raise ValueError("prefixes > 0 needs prefix_len > 0")
        return self


class _TraceSpec(_Spec):
    """Options shared by trace replays: which rows, and how to scale times and lengths."""

    path: str | None = None  # trace file; default: the standard file in the traces dir
    slice: tuple[int | None, int | None] | None = None  # rows START:STOP, before n
    n: int | None = Field(None, ge=1)  # keep the first n rows after slicing
    time_scale: float = Field(1.0, gt=0)  # multiplies inter-arrival gaps (2 = half the rate)
    output_scale: float = Field(1.0, gt=0)
    max_input: int | None = Field(None, ge=1)
    max_output: int | None = Field(None, ge=1)
    min_output: int = Field(1, ge=1)

    @field_validator("slice", mode="before")
    @classmethod
    def _slice(cls, value: Any) -> Any:
        return _parse_slice(value)


class AzureSpec(_TraceSpec):
    """Azure LLM inference trace 2023: arrival times and lengths; prompts are random tokens."""

    kind: Literal["azure"] = "azure"
    trace: Literal["conv", "code"] = "conv"
    input_scale: float = Field(1.0, gt=0)
    min_input: int = Field(1, ge=1)


class MooncakeSpec(_TraceSpec):
    """Mooncake trace: arrival times, lengths and ``hash_ids``; each id becomes a block of
    ``block`` tokens (the trace's ``trace_block`` = 512), so input lengths scale by
    ``block / trace_block`` and equal ids give equal token blocks (real prefix sharing).
    ``max_input`` drops trailing blocks, keeping the shared prefixes intact."""

    _always_shown: ClassVar[tuple[str, ...]] = ("block",)

    kind: Literal["mooncake"] = "mooncake"
    block: int = Field(512, ge=1)
    trace_block: int = Field(512, ge=1)


WorkloadSpec = Annotated[SyntheticSpec | AzureSpec | MooncakeSpec, Field(discriminator="kind")]
_WORKLOAD_ADAPTER: TypeAdapter[SyntheticSpec | AzureSpec | MooncakeSpec] = TypeAdapter(
    WorkloadSpec
)
_POSITIONAL = {"azure": "trace", "mooncake": "path", "synthetic": None}


def _split_items(text: str) -> dict[str, str]:
    kind, _, rest = text.partition(":")
    kind = kind.strip()
    out: dict[str, str] = {"kind": kind}
    for item in (s.strip() for s in rest.split(",")):
        if not item:
            continue
        if "=" in item:
            key, value = item.split("=", 1)
            out[key.strip()] = value.strip()
        else:
            key = _POSITIONAL.get(kind)
            if key is None or key in out:
                raise ValueError(f"unexpected positional item {item!r} in {text!r}")
            out[key] = item
    return out


def parse_workload(text: str) -> SyntheticSpec | AzureSpec | MooncakeSpec:
    """Parse ``KIND:key=value,...`` or a ``.yaml``/``.yml``/``.json`` file with the same keys."""
    path = Path(text)
    if path.suffix in (".yaml", ".yml", ".json") and path.is_file():
        raw = path.read_text()
        if path.suffix == ".json":
            data = json.loads(raw)
        else:
            import yaml

            data = yaml.safe_load(raw)
        return _WORKLOAD_ADAPTER.validate_python(data)
    items = _split_items(text)
    if items["kind"] not in _POSITIONAL:
        raise ValueError(f"unknown workload kind {items['kind']!r}: synthetic, azure, mooncake")
    return _WORKLOAD_ADAPTER.validate_python(items)


class ArrivalSpec(BaseModel):
    """When requests are released.

    ``poisson``/``gamma`` draw gaps at a given rate (gamma shape = vLLM's ``burstiness`` =
    ``1/cv**2``; cv > 1 is burstier than Poisson); ``trace`` uses the trace's timestamps
    (rescaled to ``--rate`` if one is given); ``closed`` keeps ``concurrency`` requests in
    flight, sending the next as soon as one finishes.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["poisson", "gamma", "trace", "closed"] = "poisson"
    cv: float | None = Field(None, gt=0)
    burstiness: float | None = Field(None, gt=0)
    concurrency: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> ArrivalSpec:
        if self.kind != "gamma" and (self.cv is not None or self.burstiness is not None):
            raise ValueError("cv/burstiness only apply to gamma arrivals")
        if self.cv is not None and self.burstiness is not None:
            raise ValueError("give cv or burstiness, not both")
        if self.kind != "closed" and self.concurrency is not None:
            raise ValueError("concurrency= belongs to closed arrivals; use --max-concurrency")
        return self

    @property
    def shape(self) -> float:
        """Gamma shape (vLLM ``burstiness``): 1 for Poisson."""
        if self.kind != "gamma":
            return 1.0
        if self.burstiness is not None:
            return self.burstiness
        if self.cv is not None:
            return 1.0 / (self.cv * self.cv)
        return 1.0

    def compact(self) -> str:
        fields = self.model_dump(exclude_defaults=True, exclude={"kind"})
        if not fields:
            return self.kind
        return self.kind + ":" + ",".join(f"{k}={v:g}" for k, v in fields.items())


def parse_arrival(text: str) -> ArrivalSpec:
    """``poisson``, ``gamma:cv=2``, ``trace``, ``closed:concurrency=4``."""
    items = _split_items(text)
    return ArrivalSpec.model_validate(items)


def parse_rates(text: str) -> list[float]:
    """``"0.5,1,2"`` -> ``[0.5, 1.0, 2.0]``; ``inf`` sends everything at once."""
    rates = [float(x) for x in text.split(",") if x.strip()]
    if not rates or any(not (r > 0) or math.isnan(r) for r in rates):
        raise ValueError(f"rates must be positive numbers, got {text!r}")
    return rates


def parse_ints(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values or any(v < 1 for v in values):
        raise ValueError(f"expected positive integers, got {text!r}")
    return values

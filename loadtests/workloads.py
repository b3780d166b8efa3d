"""Turn a workload spec into concrete requests: token-id prompts, output lengths, trace times.

Pure apart from reading the trace file: the same spec, token space and seed always give the
same requests, so two deployments compared with one seed see identical traffic. A sweep
passes a different seed per load point so no point is served from an earlier point's cache.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loadtests.prompts import (
    BlockCache,
    TokenSpace,
    hash_id_prompt,
    random_tokens,
    scaled_block_length,
)
from loadtests.spec import AzureSpec, MooncakeSpec, SyntheticSpec
from loadtests.traces import TraceRecord, read_trace, select_rows, trace_path


@dataclass
class Request:
    """One request to send. ``prompt`` is token ids; ``prompt_text`` is set in text mode."""

    request_id: str
    prompt: list[int]
    output_len: int
    timestamp: float | None = None  # trace arrival in seconds, already time-scaled
    group: int | None = None  # shared-prefix group of a synthetic request
    prompt_text: str | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.prompt)


def _scale(value: int, scale: float, minimum: int, maximum: int | None) -> int:
    scaled = max(minimum, round(value * scale))
    return min(scaled, maximum) if maximum is not None else scaled


def synthetic_requests(spec: SyntheticSpec, space: TokenSpace, seed: int | str) -> list[Request]:
    rng = random.Random(f"loadtests-synthetic:{seed}")
    prefixes = [
        random_tokens(random.Random(f"loadtests-prefix:{seed}:{g}"), spec.prefix_len, space)
        for g in range(spec.prefixes)
    ]
    out = []
    for i in range(spec.n):
        output_len = spec.output.sample(rng)
        group = None
        if prefixes:
            group = rng.randrange(len(prefixes))
            if spec.suffix_len is not None:
                suffix_len = spec.suffix_len.sample(rng, minimum=0)
            else:
                suffix_len = max(0, spec.input.sample(rng) - spec.prefix_len)
            prompt = prefixes[group] + random_tokens(rng, suffix_len, space)
        else:
            prompt = random_tokens(rng, spec.input.sample(rng), space)
        out.append(Request(f"req-{i}", prompt, output_len, None, group))
    return out


def azure_requests(
    spec: AzureSpec, rows: Sequence[TraceRecord], space: TokenSpace, seed: int | str
) -> list[Request]:
    rng = random.Random(f"loadtests-azure:{seed}")
    out = []
    for i, row in enumerate(select_rows(list(rows), spec.slice, spec.n)):
        input_len = _scale(row.input_len, spec.input_scale, spec.min_input, spec.max_input)
        output_len = _scale(row.output_len, spec.output_scale, spec.min_output, spec.max_output)
        prompt = random_tokens(rng, input_len, space)
        out.append(Request(f"req-{i}", prompt, output_len, row.timestamp * spec.time_scale))
    return out


def mooncake_requests(
    spec: MooncakeSpec, rows: Sequence[TraceRecord], space: TokenSpace, seed: int | str
) -> list[Request]:
    blocks = BlockCache(spec.block, space, seed)
    rng = random.Random(f"loadtests-mooncake:{seed}")
    out = []
    for i, row in enumerate(select_rows(list(rows), spec.slice, spec.n)):
        ids = list(row.hash_ids)
        if ids:
            length = scaled_block_length(row.input_len, len(ids), spec.block, spec.trace_block)
            if spec.max_input is not None and length > spec.max_input:
                length = spec.max_input
                ids = ids[: math.ceil(length / spec.block)]
            prompt = hash_id_prompt(ids, length, blocks)
        else:  # no prefix information: a unique prompt of the scaled length
            length = max(1, math.ceil(row.input_len * spec.block / spec.trace_block))
            if spec.max_input is not None:
                length = min(length, spec.max_input)
            prompt = random_tokens(rng, length, space)
        output_len = _scale(row.output_len, spec.output_scale, spec.min_output, spec.max_output)
        out.append(Request(f"req-{i}", prompt, output_len, row.timestamp * spec.time_scale))
    return out


def build_requests(
    spec: SyntheticSpec | AzureSpec | MooncakeSpec,
    space: TokenSpace,
    seed: int | str,
    traces_dir: Path,
) -> list[Request]:
    """Requests for ``spec``; reads the trace file for trace workloads."""
    if isinstance(spec, SyntheticSpec):
        return synthetic_requests(spec, space, seed)
    if isinstance(spec, AzureSpec):
        rows = read_trace(trace_path(f"azure:{spec.trace}", spec.path, traces_dir))
        return azure_requests(spec, rows, space, seed)
    rows = read_trace(trace_path("mooncake", spec.path, traces_dir))
    return mooncake_requests(spec, rows, space, seed)


def ideal_prefix_hit_rate(prompts: Sequence[Sequence[int]], block_size: int) -> float:
    """Share of full ``block_size``-token prompt blocks an unbounded prefix cache would hit.

    A block hits when the same block chain (this block and everything before it) was seen in
    an earlier prompt, which is how vLLM's prefix cache keys blocks.
    """
    seen: set[int] = set()
    total = hits = 0
    for prompt in prompts:
        parent = 0
        for start in range(0, len(prompt) - block_size + 1, block_size):
            key = hash((parent, tuple(prompt[start : start + block_size])))
            total += 1
            if key in seen:
                hits += 1
            else:
                seen.add(key)
            parent = key
    return hits / total if total else 0.0


def workload_stats(requests: Sequence[Request], cache_block: int) -> dict[str, float | int]:
    """Sizes of a built workload, for the report."""
    n = len(requests)
    inputs = [r.prompt_len for r in requests]
    outputs = [r.output_len for r in requests]
    times = [r.timestamp for r in requests if r.timestamp is not None]
    stats: dict[str, float | int] = {
        "num_requests": n,
        "total_input_tokens": sum(inputs),
        "total_output_tokens": sum(outputs),
        "mean_input_len": sum(inputs) / n if n else 0.0,
        "mean_output_len": sum(outputs) / n if n else 0.0,
        "max_input_len": max(inputs, default=0),
        "max_output_len": max(outputs, default=0),
        "ideal_prefix_hit_rate": ideal_prefix_hit_rate([r.prompt for r in requests], cache_block),
        "cache_block_size": cache_block,
    }
    if len(times) > 1 and times[-1] > times[0]:
        stats["trace_span_s"] = times[-1] - times[0]
        stats["trace_rate"] = (len(times) - 1) / (times[-1] - times[0])
    return stats

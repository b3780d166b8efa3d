"""Trace parsing, Mooncake prompt synthesis, synthetic workloads, specs and arrivals."""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path

import pytest

from loadtests.arrivals import arrival_offsets, gamma_offsets, trace_offsets
from loadtests.mdsection import replace_section, update_file
from loadtests.prompts import (
    BlockCache,
    TokenSpace,
    block_tokens,
    hash_id_prompt,
    scaled_block_length,
)
from loadtests.spec import (
    ArrivalSpec,
    AzureSpec,
    LengthDist,
    MooncakeSpec,
    SyntheticSpec,
    parse_arrival,
    parse_workload,
)
from loadtests.traces import (
    TraceRecord,
    parse_azure_csv,
    parse_mooncake_jsonl,
    resolve_traces_dir,
    select_rows,
)
from loadtests.workloads import (
    azure_requests,
    ideal_prefix_hit_rate,
    mooncake_requests,
    synthetic_requests,
)

SPACE = TokenSpace(100, 3900)

AZURE_ROWS = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.6805900,374,44
2023-11-16 18:15:50.9951690,396,109
2023-11-16 18:15:51.0000000,1000,1
"""

MOONCAKE_ROWS = [
    '{"timestamp": 1000, "input_length": 1000, "output_length": 10, "hash_ids": [0, 1]}',
    "",
    '{"timestamp": 1500, "input_length": 1300, "output_length": 20, "hash_ids": [0, 1, 2]}',
    '{"timestamp": 4000, "input_length": 600, "output_length": 5, "hash_ids": [7, 8]}',
]


# ---- trace parsing ------------------------------------------------------------------


def test_parse_azure_rebases_times_to_seconds() -> None:
    rows = parse_azure_csv(AZURE_ROWS.splitlines(keepends=True))
    assert [r.input_len for r in rows] == [374, 396, 1000]
    assert [r.output_len for r in rows] == [44, 109, 1]
    assert rows[0].timestamp == 0.0
    assert rows[1].timestamp == pytest.approx(4.314579)
    assert rows[2].timestamp == pytest.approx(4.31941)
    assert rows[0].hash_ids == ()


def test_parse_azure_rejects_other_columns() -> None:
    with pytest.raises(ValueError, match="lacks columns"):
        parse_azure_csv(["a,b\n", "1,2\n"])


def test_parse_mooncake_ms_to_seconds_and_hash_ids() -> None:
    rows = parse_mooncake_jsonl(MOONCAKE_ROWS)
    assert [r.timestamp for r in rows] == [0.0, 0.5, 3.0]
    assert rows[1] == TraceRecord(0.5, 1300, 20, (0, 1, 2))
    with pytest.raises(ValueError, match="line 1"):
        parse_mooncake_jsonl(['{"timestamp": 0}'])


def test_select_rows_slices_then_rebases() -> None:
    rows = parse_mooncake_jsonl(MOONCAKE_ROWS)
    picked = select_rows(rows, (1, None), None)
    assert [r.timestamp for r in picked] == [0.0, 2.5]
    assert [r.input_len for r in select_rows(rows, None, 2)] == [1000, 1300]
    assert select_rows(rows, (5, 9), None) == []


def test_real_traces_parse() -> None:
    traces = resolve_traces_dir()
    assert (traces / "mooncake_synthetic_trace.jsonl").is_file(), (
        f"shared traces not found in {traces}; they live in ../shared/traces")
    from loadtests.traces import read_trace

    mooncake = read_trace(traces / "mooncake_synthetic_trace.jsonl")
    assert len(mooncake) == 3993
    assert all(len(r.hash_ids) == math.ceil(r.input_len / 512) for r in mooncake)
    assert len(read_trace(traces / "AzureLLMInferenceTrace_conv.csv")) == 19366
    assert len(read_trace(traces / "AzureLLMInferenceTrace_code.csv")) == 8819


# ---- Mooncake prompt synthesis ------------------------------------------------------


def test_equal_hash_ids_give_identical_blocks() -> None:
    assert block_tokens(42, 16, SPACE, seed=3) == block_tokens(42, 16, SPACE, seed=3)
    cache = BlockCache(16, SPACE, seed=3)
    a = hash_id_prompt([5, 6, 7], 48, cache)
    b = hash_id_prompt([5, 6, 9], 40, cache)
    assert a[:32] == b[:32]  # two shared ids -> 32 shared tokens
    assert a[32:40] != b[32:40]
    assert a[16:32] == block_tokens(6, 16, SPACE, seed=3)


def test_different_hash_ids_give_different_blocks() -> None:
    blocks = {tuple(block_tokens(h, 16, SPACE, seed=0)) for h in range(20000)}
    assert len(blocks) == 20000
    # Even one-token blocks are distinct while ids fit in the token space.
    tiny = {tuple(block_tokens(h, 1, SPACE, seed=0)) for h in range(SPACE.size)}
    assert len(tiny) == SPACE.size
    # A different seed gives different content for the same id (fresh cache per run).
    assert block_tokens(1, 16, SPACE, seed=0) != block_tokens(1, 16, SPACE, seed=1)
    assert all(SPACE.lo <= t < SPACE.hi for t in block_tokens(10**9, 64, SPACE, seed=0))


def test_scaled_block_length_keeps_the_block_count() -> None:
    assert scaled_block_length(1000, 2, 16, 512) == 32  # ceil(31.25), within (16, 32]
    assert scaled_block_length(513, 2, 16, 512) == 17  # ceil(16.03)
    assert scaled_block_length(512, 1, 16, 512) == 16
    assert scaled_block_length(1, 1, 16, 512) == 1
    assert scaled_block_length(10, 3, 16, 512) == 33  # inconsistent row: clamp to 3 blocks
    assert scaled_block_length(5000, 2, 16, 512) == 32
    assert scaled_block_length(1000, 2, 512, 512) == 1000  # no scaling: exact trace length


def test_mooncake_requests_lengths_exact_and_prefixes_shared() -> None:
    rows = parse_mooncake_jsonl(MOONCAKE_ROWS)
    spec = MooncakeSpec(block=16, max_output=15, time_scale=2.0)
    reqs = mooncake_requests(spec, rows, SPACE, seed=0)
    assert [r.prompt_len for r in reqs] == [32, 41, 19]  # ceil(1000/32), ceil(1300/32), ...
    assert [r.output_len for r in reqs] == [10, 15, 5]
    assert [r.timestamp for r in reqs] == [0.0, 1.0, 6.0]
    assert reqs[0].prompt == reqs[1].prompt[:32]  # ids [0, 1] shared
    assert reqs[2].prompt[:16] != reqs[0].prompt[:16]
    again = mooncake_requests(spec, rows, SPACE, seed=0)
    assert [r.prompt for r in again] == [r.prompt for r in reqs]


def test_mooncake_max_input_drops_trailing_blocks() -> None:
    rows = parse_mooncake_jsonl(MOONCAKE_ROWS)
    reqs = mooncake_requests(MooncakeSpec(block=16, max_input=20), rows, SPACE, seed=0)
    assert [r.prompt_len for r in reqs] == [20, 20, 19]
    assert reqs[0].prompt == reqs[1].prompt  # both cut inside block 1 of the shared run


def test_azure_requests_scale_and_cap() -> None:
    rows = parse_azure_csv(AZURE_ROWS.splitlines(keepends=True))
    spec = AzureSpec(input_scale=0.5, output_scale=2, max_input=400, max_output=100)
    reqs = azure_requests(spec, rows, SPACE, seed=0)
    assert [r.prompt_len for r in reqs] == [187, 198, 400]
    assert [r.output_len for r in reqs] == [88, 100, 2]
    assert len({tuple(r.prompt) for r in reqs}) == 3


# ---- synthetic ----------------------------------------------------------------------


def test_synthetic_fixed_lengths_and_determinism() -> None:
    spec = SyntheticSpec(n=20, input=LengthDist(a=300), output=LengthDist(a=7))
    reqs = synthetic_requests(spec, SPACE, seed=1)
    assert len(reqs) == 20
    assert {r.prompt_len for r in reqs} == {300} and {r.output_len for r in reqs} == {7}
    assert [r.prompt for r in synthetic_requests(spec, SPACE, seed=1)] == [r.prompt for r in reqs]
    assert synthetic_requests(spec, SPACE, seed=2)[0].prompt != reqs[0].prompt


def test_synthetic_distributions_stay_in_bounds() -> None:
    spec = parse_workload("synthetic:n=200,input=uniform:10:20,output=normal:8:3")
    assert isinstance(spec, SyntheticSpec)
    reqs = synthetic_requests(spec, SPACE, seed=0)
    assert {r.prompt_len for r in reqs} <= set(range(10, 21))
    assert min(r.output_len for r in reqs) >= 1


def test_synthetic_shared_prefix_groups() -> None:
    spec = parse_workload("synthetic:n=40,prefixes=3,prefix_len=64,suffix_len=16,output=4")
    reqs = synthetic_requests(spec, SPACE, seed=0)  # type: ignore[arg-type]
    assert {r.prompt_len for r in reqs} == {80}
    groups = {r.group for r in reqs}
    assert groups == {0, 1, 2}
    by_group: dict[int | None, set[tuple[int, ...]]] = {}
    for r in reqs:
        by_group.setdefault(r.group, set()).add(tuple(r.prompt[:64]))
    assert all(len(prefixes) == 1 for prefixes in by_group.values())
    assert len({next(iter(p)) for p in by_group.values()}) == 3
    assert len({tuple(r.prompt) for r in reqs}) == 40  # suffixes unique


def test_ideal_prefix_hit_rate_hand_case() -> None:
    prompts = [[1, 2, 3, 4], [1, 2, 3, 5], [9, 2, 3, 4, 7]]
    # blocks of 2: p1 (1,2)(3,4) new; p2 (1,2) hit, (3,5) new; p3 (9,2) new, (3,4) new:
    # its parent differs, so the chain differs. 1 hit of 6 full blocks.
    assert ideal_prefix_hit_rate(prompts, 2) == pytest.approx(1 / 6)
    assert ideal_prefix_hit_rate([], 16) == 0.0


# ---- specs --------------------------------------------------------------------------


def test_parse_workload_compact_forms() -> None:
    spec = parse_workload("azure:code,slice=10:20,time_scale=2,max_output=64")
    assert isinstance(spec, AzureSpec)
    assert (spec.trace, spec.slice, spec.time_scale, spec.max_output) == ("code", (10, 20), 2, 64)
    spec2 = parse_workload("mooncake:block=16,slice=:100,n=5")
    assert isinstance(spec2, MooncakeSpec) and spec2.slice == (None, 100) and spec2.n == 5
    assert parse_workload(spec2.compact()) == spec2
    syn = parse_workload("synthetic:n=3,input=uniform:5:9")
    assert parse_workload(syn.compact()) == syn
    for bad in ("nope:n=1", "synthetic:bogus=1", "azure:conv,slice=5",
                "synthetic:input=uniform:9:5", "synthetic:prefixes=2"):
        with pytest.raises(ValueError):
            parse_workload(bad)


def test_parse_workload_file(tmp_path: Path) -> None:
    path = tmp_path / "w.yaml"
    path.write_text("kind: synthetic\nn: 5\ninput: uniform:10:20\noutput: 3\n")
    spec = parse_workload(str(path))
    assert isinstance(spec, SyntheticSpec)
    assert spec.n == 5 and spec.input == LengthDist(kind="uniform", a=10, b=20)


def test_parse_arrival() -> None:
    assert parse_arrival("poisson").shape == 1.0
    assert parse_arrival("gamma:cv=2").shape == pytest.approx(0.25)
    assert parse_arrival("gamma:burstiness=4").shape == 4.0
    assert parse_arrival("closed:concurrency=4") == ArrivalSpec(kind="closed", concurrency=4)
    for bad in ("poisson:cv=2", "gamma:cv=1,burstiness=1", "uniform", "poisson:concurrency=2"):
        with pytest.raises(ValueError):
            parse_arrival(bad)


# ---- arrivals -----------------------------------------------------------------------


def test_gamma_offsets_rate_and_burstiness() -> None:
    n, rate = 20000, 4.0
    for cv in (1.0, 2.0):
        offsets = gamma_offsets(n, rate, 1 / cv**2, random.Random(0))
        gaps = [b - a for a, b in itertools.pairwise(offsets)]
        mean = sum(gaps) / len(gaps)
        std = math.sqrt(sum((g - mean) ** 2 for g in gaps) / len(gaps))
        assert offsets[0] == 0.0
        assert mean == pytest.approx(1 / rate, rel=0.05)
        assert std / mean == pytest.approx(cv, rel=0.08)
    assert gamma_offsets(3, math.inf, 1.0, random.Random(0)) == [0.0, 0.0, 0.0]


def test_trace_offsets_rescale_to_rate() -> None:
    assert trace_offsets([5.0, 6.0, 8.0]) == [0.0, 1.0, 3.0]
    # natural rate 2 / 3 req/s -> at 2 req/s gaps shrink 3x
    assert trace_offsets([0.0, 1.0, 3.0], rate=2.0) == pytest.approx([0.0, 1 / 3, 1.0])


def test_arrival_offsets_dispatch() -> None:
    assert arrival_offsets(ArrivalSpec(kind="closed", concurrency=2), 3, None, [None] * 3, 0) \
        is None
    assert arrival_offsets(ArrivalSpec(kind="trace"), 2, None, [0.0, 2.0], 0) == [0.0, 2.0]
    first = arrival_offsets(ArrivalSpec(), 5, 1.0, [None] * 5, "s")
    assert first == arrival_offsets(ArrivalSpec(), 5, 1.0, [None] * 5, "s")  # seeded
    with pytest.raises(ValueError):
        arrival_offsets(ArrivalSpec(kind="trace"), 1, None, [None], 0)
    with pytest.raises(ValueError):
        arrival_offsets(ArrivalSpec(), 1, None, [None], 0)


def test_token_space_for_vocab() -> None:
    assert TokenSpace.for_vocab(4096) == TokenSpace(204, 3892)
    assert TokenSpace.for_vocab(10) == TokenSpace(1, 10)
    assert TokenSpace.parse("5:9") == TokenSpace(5, 9)
    with pytest.raises(ValueError):
        TokenSpace(9, 5)


# ---- docs sections ------------------------------------------------------------------


def test_replace_section_touches_only_its_markers(tmp_path: Path) -> None:
    other = "# Benchmarks\n\nintro\n<!-- other:start -->\nkeep me\n<!-- other:end -->\ntail\n"
    once = replace_section(other, "mine", "v1")
    assert once.startswith(other) and once.endswith("<!-- mine:start -->\nv1\n<!-- mine:end -->\n")
    twice = replace_section(once, "mine", "v2\n")
    assert twice == once.replace("\nv1\n", "\nv2\n")
    with pytest.raises(ValueError):
        replace_section("<!-- mine:end -->\n<!-- mine:start -->\n", "mine", "x")
    with pytest.raises(ValueError):
        replace_section("<!-- mine:start -->\n", "mine", "x")
    path = tmp_path / "docs" / "B.md"
    update_file(path, "mine", "hello")
    assert path.read_text() == "# Benchmarks\n\n<!-- mine:start -->\nhello\n<!-- mine:end -->\n"

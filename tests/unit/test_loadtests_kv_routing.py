"""The KV-routing scenario's pure parts: prompt synthesis from hash ids, the oracle, the hit
rate from engine counters, the targets, and its app config against the app's schema."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtests.mdsection import markers
from loadtests.scenarios import kv_routing as scenario
from loadtests.traces import TraceRecord

B = scenario.BLOCK
# A stand-in for the model's single-token words: (token id, text), 500 of them.
WORDS = [(1000 + i, " w" + "".join(chr(97 + int(d)) for d in str(i))) for i in range(500)]
WORD_IDS = {i for i, _ in WORDS}


def _workload(rows, max_model_len=2048, max_output=32, rate=None):
    return scenario.build_workload(rows, words=WORDS, seed=0, max_model_len=max_model_len,
                                   max_output=max_output, min_output=2, rate=rate)


def test_hash_id_blocks_are_deterministic_and_shared_exactly_by_prefix() -> None:
    rows = [TraceRecord(0.0, 3 * 512, 10, (7, 8, 9)),
            TraceRecord(1.0, 3 * 512, 10, (7, 8, 11)),
            TraceRecord(2.0, 3 * 512, 10, (12, 8, 9))]
    a, b, c = (t.request.prompt for t in _workload(rows))
    assert len(a) == len(b) == len(c) == 3 * B  # 512-token trace blocks -> 32-token blocks
    assert a[: 2 * B] == b[: 2 * B] and a[2 * B:] != b[2 * B:]  # ids 7, 8 shared
    assert a[:B] != c[:B] and a[B: 2 * B] == c[B: 2 * B]  # same id, same block anywhere
    again = _workload(rows)  # a pure function of (id, seed)
    assert [t.request.prompt for t in again] == [a, b, c]
    assert set(a + b + c) <= WORD_IDS
    text = {i: t for i, t in WORDS}
    for t in again:  # the text is exactly the ids' words, in order
        assert t.request.prompt_text == "".join(text[i] for i in t.request.prompt)


def test_warmup_prompts_share_no_block_with_the_workload() -> None:
    rows = [TraceRecord(0.0, 3 * 512, 10, (i, i + 1, i + 2)) for i in range(0, 30, 3)]
    blocks = {tuple(t.request.prompt[k: k + B]) for t in _workload(rows)
              for k in range(0, t.request.prompt_len, B)}
    warm = scenario.warmup_requests(4, WORDS)
    assert len(warm) == 4 and all(r.prompt_len == 40 for r in warm)
    assert all(tuple(r.prompt[:B]) not in blocks for r in warm)
    assert all(r.prompt_text == "".join(dict(WORDS)[i] for i in r.prompt) for r in warm)


def test_prompts_are_capped_by_dropping_trailing_ids() -> None:
    ids = tuple(range(100))  # 100 trace blocks -> 3200 tokens, over a 2048 context
    (t,) = _workload([TraceRecord(0.0, 100 * 512, 500, ids)], max_model_len=2048,
                     max_output=32)
    assert t.request.prompt_len == 2048 - 32 == 63 * B
    assert t.hash_ids == ids[:63]
    assert t.request.output_len == 32  # trace output clamped to max_output
    (short,) = _workload([TraceRecord(0.0, 40, 1, (5,))])
    assert short.request.prompt_len == 3 and short.hash_ids == (5,)  # ceil(40 * 32 / 512)
    assert short.request.output_len == 2  # min_output
    assert scenario.max_prompt_tokens(2048, 32) == 2016
    with pytest.raises(ValueError):
        scenario.max_prompt_tokens(32, 32)


def test_arrivals_keep_the_trace_pattern_at_the_asked_rate() -> None:
    rows = [TraceRecord(t, 512, 4, (i,)) for i, t in enumerate((0.0, 1.0, 3.0, 4.0))]
    offsets = [t.offset for t in _workload(rows, rate=0.5)]  # 3 gaps at 0.5 req/s: 6 s span
    assert offsets == pytest.approx([0.0, 1.5, 4.5, 6.0])


def test_window_defaults_to_the_trace_tail() -> None:
    assert scenario.window(3993, 150, None) == (3843, 3993)
    assert scenario.window(3993, 150, 10) == (10, 160)
    assert scenario.window(100, 150, None) == (0, 100)
    with pytest.raises(ValueError):
        scenario.window(100, 0, None)


def test_oracle_on_a_hand_example() -> None:
    prompts = [
        ((1, 2, 3), 96),  # first: nothing cached
        ((1, 2, 3), 96),  # same 3 full blocks, but the last token is always computed: 2
        ((1, 2, 4, 5), 100),  # shares ids 1, 2: 2 blocks (3 full + a partial 4th)
        ((1, 2, 4, 5), 128),  # 1, 2, 4 were full blocks before; 5 was partial: 3
        ((1, 2, 4, 5), 128),  # now 5 was full too, but capped at (128 - 1) // 32 = 3
        ((9,), 20),  # partial single block: nothing to hit
        ((9,), 20),  # ... and nothing cached by the one before
        ((2, 3), 64),  # ids 2, 3 appeared, but never as a prefix: 0
    ]
    assert scenario.oracle_cached_tokens(prompts) == [0, 64, 64, 96, 96, 0, 0, 0]
    total = 96 + 96 + 100 + 128 + 128 + 20 + 20 + 64
    assert scenario.oracle_hit_rate(prompts) == pytest.approx((64 + 64 + 96 + 96) / total)
    assert scenario.oracle_hit_rate([]) == 0.0


def test_oracle_matches_the_token_level_prefix_cache_on_built_prompts() -> None:
    """Hash-id chains and token-block chains agree, because blocks are a function of ids."""
    rows = [TraceRecord(float(i), n * 512, 8, ids) for i, (n, ids) in enumerate([
        (3, (1, 2, 3)), (4, (1, 2, 3, 4)), (2, (1, 5)), (4, (1, 2, 3, 4)), (3, (6, 2, 3))])]
    workload = _workload(rows)
    seen: set[tuple[int, ...]] = set()
    expected = []
    for t in workload:
        p = t.request.prompt
        keys = [tuple(p[: (k + 1) * B]) for k in range(len(p) // B)]
        usable = (len(p) - 1) // B
        hit = 0
        while hit < usable and keys[hit] in seen:
            hit += 1
        expected.append(hit * B)
        seen.update(keys)
    got = scenario.oracle_cached_tokens([(t.hash_ids, t.request.prompt_len) for t in workload])
    assert got == expected == [0, 96, 32, 96, 0]


def test_hit_rate_from_engine_counters_on_a_hand_example() -> None:
    """Two requests of 100 prompt tokens: one disaggregated (prefill computes 100; its decode
    engine loads 100 over NIXL, computes none), one prefilled on a decode engine that held
    64 of its tokens (computes 36)."""
    def stats(role, total, computed, local, external):
        return {"role": role, "prompt_tokens_total": total, "prompt_tokens_computed": computed,
                "prompt_tokens_local_cache_hit": local,
                "prompt_tokens_external_kv_transfer": external}

    before = {"p1": stats("prefill", 10, 10, 0, 0), "d1": stats("decode", 5, 5, 0, 0),
              "d2": stats("decode", 0, 0, 0, 0)}
    after = {"p1": stats("prefill", 110, 110, 0, 0), "d1": stats("decode", 105, 5, 0, 100),
             "d2": stats("decode", 100, 36, 64, 0),
             "p2": stats("prefill", 0, 0, 0, 0)}  # not seen before: counts from zero
    deltas = scenario.counter_deltas(before, after)
    assert deltas["d1"]["prompt_tokens_computed"] == 0
    assert deltas["d1"]["prompt_tokens_external_kv_transfer"] == 100
    assert deltas["p2"]["prompt_tokens_total"] == 0
    assert scenario.engine_hit_rate(deltas, 200) == pytest.approx(1 - 136 / 200)
    assert scenario.engine_hit_rate(deltas, 0) is None
    roles = scenario.by_role(deltas)
    assert roles["decode"]["replicas"] == 2 and roles["decode"]["prompt_tokens_total"] == 200
    assert roles["prefill"]["prompt_tokens_computed"] == 100
    # A replica that restarted (counter went down) counts from zero, never negative.
    restarted = scenario.counter_deltas({"p1": stats("prefill", 500, 500, 0, 0)},
                                        {"p1": stats("prefill", 40, 40, 0, 0)})
    assert restarted["p1"]["prompt_tokens_computed"] == 40


@pytest.mark.parametrize("policy", scenario.POLICIES)
def test_app_args_validate_against_app_config(policy: str) -> None:
    config = pytest.importorskip("app.config")
    cfg = config.AppConfig.model_validate(
        scenario.app_args(policy, "models/small-llama", "small-llama", 2048, 512 * 1024**2))
    assert cfg.routing.policy == policy
    assert cfg.mode == "disaggregated"
    assert cfg.prefill.num_replicas == cfg.decode.num_replicas == 2
    assert cfg.prefill.cpu_cores is None and cfg.decode.cpu_cores is None
    assert cfg.engine_args["block_size"] == scenario.BLOCK
    assert cfg.routing.advertise_host == "127.0.0.1"


def _summary(ttft_ms: float, hit: float | None, oracle: float = 0.6) -> dict:
    rows = [{"ttft": ttft_ms / 1e3, "tpot": 0.02, "latency": 1.0, "success": True,
             "prompt_len": 100, "route": "disaggregated"}]
    s = scenario.summarize_policy(rows, {}, oracle)
    s["hit_rate"] = hit
    s["hit_vs_oracle"] = None if hit is None else hit / oracle
    return s


def test_summary_and_targets() -> None:
    rows = [
        {"ttft": 0.1, "tpot": 0.02, "latency": 0.5, "success": True, "prompt_len": 100,
         "route": "disaggregated"},
        {"ttft": 0.3, "tpot": 0.04, "latency": 0.9, "success": True, "prompt_len": 60,
         "route": "local-prefill:short"},
        {"ttft": None, "tpot": None, "latency": None, "success": False, "prompt_len": 40,
         "route": "", "error": "HTTP 503: x"},
    ]
    deltas = {"p": {"role": "prefill", "prompt_tokens_computed": 50},
              "d": {"role": "decode", "prompt_tokens_computed": 50}}
    s = scenario.summarize_policy(rows, deltas, oracle=0.6)
    assert (s["requests"], s["errors"]) == (3, 1)
    assert s["ttft_p50_ms"] == pytest.approx(200.0)
    assert s["hit_rate"] == pytest.approx(0.5) and s["hit_vs_oracle"] == pytest.approx(0.5 / 0.6)
    assert s["routes"] == {"disaggregated": 1, "local-prefill:short": 1, "none": 1}

    good = {"kv": _summary(100, 0.57), "power_of_two": _summary(200, 0.3),
            "prefix_affinity": _summary(150, 0.4)}
    assert [ok for _, ok in scenario.check_targets(good)] == [True, True, True]
    bad = {"kv": _summary(150, 0.5), "power_of_two": _summary(200, 0.3),
           "prefix_affinity": _summary(150, 0.4)}
    assert [ok for _, ok in scenario.check_targets(bad)] == [False, False, False]
    assert [ok for _, ok in scenario.check_targets({"kv": good["kv"]})] == [True, None, None]


def test_docs_section_is_written_between_its_markers(tmp_path: Path) -> None:
    meta = {"date": "20260101-000000", "command": "python -m loadtests.scenarios.kv_routing",
            "hardware": {"nproc": 2, "cpu_model": "test cpu", "git_commit": "abc"},
            "model_path": "models/small-llama", "served_model_name": "small-llama",
            "max_model_len": 2048, "kv_cache_mib": 512, "warmup": 4,
            "workload": {"rows": [3843, 3993], "requests": 150, "max_prompt": 2016,
                         "min_output": 2, "max_output": 32, "prompt_tokens": 1000,
                         "mean_prompt": 100.0, "max_prompt_len": 2016, "rate": 1.0,
                         "span_s": 149.0, "oracle_hit_rate": 0.6}}
    results = {p: {"meta": meta, "summary": _summary(100 + 50 * i, 0.5)}
               for i, p in enumerate(scenario.POLICIES)}
    body = scenario.docs_section(results)
    assert body.startswith("## KV-aware routing on the Mooncake trace (issue 7)")
    assert "| kv | 1 | 0 | 100.0 |" in body and "**FAIL**" in body
    assert "Other vLLM engines" not in body
    results["kv"]["summary"]["contention"] = {
        "start": {"loadavg_1m": 9.0, "foreign_engines": 3},
        "end": {"loadavg_1m": 4.0, "foreign_engines": 0}}
    assert "kv 3/0, 9.0/4.0" in scenario.docs_section(results)  # noisy neighbours are said
    # A policy rerun on its own joins with its own command line; another workload cannot.
    results["kv"]["meta"] = {**meta, "command": "... --policies kv", "date": "20260102-000000"}
    assert "- kv: `... --policies kv` (20260102-000000" in scenario.docs_section(results)
    results["kv"]["meta"] = {**meta, "workload": {**meta["workload"], "rate": 2.0}}
    with pytest.raises(ValueError):
        scenario.docs_section(results)
    docs = tmp_path / "BENCHMARKS.md"
    docs.write_text("# Benchmarks\n\nother text\n")
    scenario.update_file(docs, scenario.SECTION, body)
    text = docs.read_text()
    start, end = markers(scenario.SECTION)
    assert text.startswith("# Benchmarks\n\nother text\n") and start in text and end in text


def test_word_vocabulary_texts_tokenize_back_to_their_ids(tmp_path: Path) -> None:
    """On a small byte-level BPE like the model's: the words found are single tokens, and a
    workload's texts tokenize to exactly its ids (what the scenario checks before running)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    names = ["cache", "block", "prefill", "decode", "token", "route", "engine", "queue"]
    corpus = [" ".join(names[(i * k) % len(names)] for k in range(1, 12)) + ", 42!"
              for i in range(200)]
    tok.train_from_iterator(corpus, trainer=trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    words = scenario.word_vocabulary(path)
    assert {text for _, text in words} >= {" " + n for n in names}
    assert all(tok.encode(text).ids == [i] for i, text in words)
    rows = [TraceRecord(0.0, 2 * 512, 4, (1, 2)), TraceRecord(1.0, 3 * 512, 4, (1, 2, 3))]
    workload = scenario.build_workload(rows, words=words, seed=0, max_model_len=2048,
                                       max_output=32, min_output=2, rate=None)
    assert scenario.check_round_trip(path, workload) == 0
    workload[0].request.prompt = workload[0].request.prompt[1:]  # a broken one is caught
    assert scenario.check_round_trip(path, workload) == 1

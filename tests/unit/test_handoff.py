"""The handoff's pure parts: the first-token fast path's rules and chunks, the timeline."""

import json
import time

import pytest

from app.handoff.first_token import (
    PrefillToken,
    decode_continuation,
    first_chunks,
    formatter,
    ineligible,
)
from app.handoff.timeline import (
    EngineStampBook,
    HandoffTimeline,
    engine_stamps,
    median_stages,
)


def _events(chunks):
    return [json.loads(c[len("data: "):]) for c in chunks]


@pytest.mark.parametrize("kind,body,why", [
    ("completion", {"stream": False}, "not streamed"),
    ("completion", {"stream": True, "n": 2}, "n > 1 or beam search"),
    ("completion", {"stream": True, "max_tokens": 1}, "one token asked for"),
    ("chat", {"stream": True, "max_completion_tokens": 1, "max_tokens": 9},
     "one token asked for"),
    ("completion", {"stream": True, "stop": ["\n"]}, "stop strings"),
    ("chat", {"stream": True, "tools": [{"type": "function"}]},
     "tools, response format or structured output"),
    ("chat", {"stream": True, "logprobs": True}, "logprobs"),
    ("completion", {"stream": True, "logprobs": 0}, "logprobs"),
    ("completion", {"stream": True, "echo": True}, "echo or prompt logprobs"),
    ("completion", {"stream": True, "frequency_penalty": 0.5},
     "presence or frequency penalty"),
    ("completion", {"stream": True, "stream_options": {"continuous_usage_stats": True}},
     "continuous usage stats"),
])
def test_requests_the_continuation_would_change_take_the_usual_path(kind, body, why):
    assert ineligible(kind, body) == why


def test_plain_streams_are_eligible():
    assert ineligible("completion", {"stream": True, "max_tokens": 32, "logprobs": None,
                                     "temperature": 0.7, "seed": 3}) is None
    assert ineligible("chat", {"stream": True, "logprobs": False,
                               "stream_options": {"include_usage": True}}) is None


def test_prefill_answer_parsed_for_both_kinds():
    completion = {"id": "cmpl-1", "created": 5, "model": "m", "choices": [
        {"text": " the", "token_ids": [7], "prompt_token_ids": [1, 2, 3],
         "finish_reason": "length"}]}
    first = PrefillToken.parse("completion", completion)
    assert (first.prompt_ids, first.token_id, first.text) == ([1, 2, 3], 7, " the")
    chat = {"id": "chatcmpl-1", "created": 5, "model": "m", "prompt_token_ids": [4, 5],
            "choices": [{"message": {"role": "assistant", "content": "Hi"},
                         "token_ids": [9], "finish_reason": "length"}]}
    first = PrefillToken.parse("chat", chat)
    assert (first.prompt_ids, first.token_id, first.text) == ([4, 5], 9, "Hi")
    assert PrefillToken.parse("completion", {"choices": [{"text": "x"}]}) is None


def test_decode_cannot_continue_after_eos_or_on_a_block_boundary():
    first = PrefillToken("c", 1, "m", list(range(40)), 7, "x", "length")
    assert first.continues(block_size=32) is None
    aligned = PrefillToken("c", 1, "m", list(range(64)), 7, "x", "length")
    assert aligned.continues(block_size=32) == "prompt ends on a KV block boundary"
    eos = PrefillToken("c", 1, "m", list(range(40)), 2, "", "stop")
    assert "finished the request" in eos.continues(block_size=32)
    for partial in ("", "\ufffd", "a\ufffd"):  # one byte of a longer UTF-8 character
        byte = PrefillToken("c", 1, "m", list(range(40)), 147, partial, "length")
        assert byte.continues(block_size=32) == "token 1 is not whole text"


def test_continuation_is_prompt_ids_plus_token_one_with_the_kv_params():
    first = PrefillToken("c", 1, "m", [1, 2, 3], 7, "x", "length")
    body = {"stream": True, "max_tokens": 10, "temperature": 0.0, "ignore_eos": True,
            "min_tokens": 4}
    cont = decode_continuation("completion", body, first, "m", {"remote_engine_id": "p"})
    assert cont["prompt"] == [1, 2, 3, 7]
    assert cont["max_tokens"] == 9 and cont["min_tokens"] == 3
    assert cont["kv_transfer_params"] == {"remote_engine_id": "p"}
    assert cont["ignore_eos"] is True and cont["stream"] is True


def test_first_chunks_look_like_vllms_and_the_rest_keeps_id_and_usage():
    first = PrefillToken("cmpl-9", 11, "m", [1, 2, 3], 7, " a", "length")
    body = {"stream": True, "return_token_ids": True, "model": "m",
            "stream_options": {"include_usage": True}}
    fmt = formatter("completion", body, first, "m")
    (event,) = _events(first_chunks("completion", body, first, fmt))
    assert event["id"] == "cmpl-9" and event["object"] == "text_completion"
    assert event["choices"][0]["text"] == " a"
    assert event["choices"][0]["token_ids"] == [7]
    assert event["choices"][0]["prompt_token_ids"] == [1, 2, 3]
    rest, ids = fmt.convert({"id": "other", "choices": [
        {"index": 0, "text": " b", "token_ids": [8], "finish_reason": None}]})
    assert json.loads(rest[6:])["id"] == "cmpl-9" and ids == [8]
    usage, _ = fmt.convert({"choices": [], "usage": {"prompt_tokens": 4,
                                                     "completion_tokens": 5}})
    assert json.loads(usage[6:])["usage"] == {"prompt_tokens": 3, "completion_tokens": 6,
                                              "total_tokens": 9}


def test_chat_starts_with_the_role_then_token_one():
    first = PrefillToken("chatcmpl-9", 11, "m", [1, 2], 7, "Hi", "length")
    body = {"stream": True, "model": "m"}
    role, token = _events(first_chunks("chat", body, first, formatter("chat", body, first,
                                                                       "m")))
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert token["choices"][0]["delta"] == {"content": "Hi"}
    assert role["object"] == token["object"] == "chat.completion.chunk"
    assert "token_ids" not in token["choices"][0] and "prompt_token_ids" not in role


class _Stats:
    queued_ts, scheduled_ts, first_token_ts, last_token_ts = 10.0, 10.5, 0.0, 0.0


def test_timeline_stages_from_front_and_engine_marks():
    t = HandoffTimeline()
    t.mark("received", 9.0)
    t.engine("prefill", {"queued": 9.01, "scheduled": 9.02, "first_token": 9.05})
    t.mark("prefill_returned", 9.06)
    t.engine("decode", {"queued": 9.07, "scheduled": 9.09, "first_token": 9.10})
    t.mark("decode_first_chunk", 9.11)
    t.mark("first_chunk", 9.065)
    t.kv_bytes = 40_000_000
    record = t.record()
    stages = record["stages_ms"]
    assert stages["prefill_compute"] == pytest.approx(30.0)
    assert stages["kv_wait"] == pytest.approx(20.0)
    assert stages["first_chunk_ms"] == pytest.approx(65.0)
    assert stages["decode_first_chunk_ms"] == pytest.approx(110.0)
    assert record["in_path_gbps"] == pytest.approx(40e6 / 0.04 / 1e9, rel=1e-3)
    assert record["in_path_ms"] == pytest.approx(40.0)
    t.kv_bytes = 0  # a push: decode read nothing, the span is still the handoff's
    assert "in_path_gbps" not in t.record() and t.record()["in_path_ms"] == pytest.approx(40.0)
    early = HandoffTimeline()  # decode scheduled before prefill's engine put out token 1
    early.engine("prefill", {"first_token": 9.05})
    early.engine("decode", {"scheduled": 9.049})
    early.kv_bytes = 40_000_000
    assert early.record()["in_path_ms"] == 0.0 and "in_path_gbps" not in early.record()
    assert engine_stamps(_Stats()) == {"queued": 10.0, "scheduled": 10.5}
    t.mark("received", 99.0)  # first mark wins
    assert t.marks["received"] == 9.0


def test_local_stages_of_a_request_one_engine_serves_whole():
    t = HandoffTimeline(route="aggregated")
    t.mark("received", 5.000)
    t.engine("decode", {"queued": 5.002, "scheduled": 5.003, "first_token": 5.060})
    t.mark("decode_first_chunk", 5.063)
    record = t.record()
    assert record["route"] == "aggregated"
    stages = record["stages_ms"]
    assert [stages[s] for s in ("local_to_engine", "local_queue", "local_compute",
                                "to_socket")] == pytest.approx([2.0, 1.0, 57.0, 3.0])
    assert "in_path_ms" not in record and "prefill_compute" not in stages
    assert "kv_wait" not in stages and "decode_first_step" not in stages  # P/D names only


def test_median_stages_over_records():
    records = [{"stages_ms": {"kv_wait": v}, "kv_read_ms": v / 2} for v in (1, 3, 10)]
    assert median_stages(records) == {"kv_wait": 3, "kv_read_ms": 1.5}


async def test_stamp_book_keeps_first_marks_of_each_request_bounded():
    class Out:
        def __init__(self, first):
            self.metrics = type("S", (), {"queued_ts": 1.0, "scheduled_ts": 2.0,
                                          "first_token_ts": first})()

    async def generate(prompt, params, request_id):
        for first in (3.0, 4.0):
            yield Out(first)

    book = EngineStampBook(keep=2)
    wrapped = book.wrap(generate)
    for rid in ("cmpl-a-0", "cmpl-b-0", "cmpl-c-0"):
        assert len([o async for o in wrapped("p", None, rid)]) == 2
    stamps = book.lookup(["cmpl-c-0"])
    assert stamps.pop("generate_in") <= time.monotonic()
    assert stamps == {"queued": 1.0, "scheduled": 2.0, "first_token": 3.0}
    assert book.lookup(["cmpl-a-0", "a"]) == {}  # the oldest went
    book.note("c", {"replica_in": 0.5})  # the replica's mark, under the client-level id
    assert book.lookup(["cmpl-c-0", "c"])["replica_in"] == 0.5


def test_detail_stages_split_the_prefill_side():
    t = HandoffTimeline()
    t.mark("received", 1.000)
    t.engine("prefill", {"replica_in": 1.002, "generate_in": 1.003, "queued": 1.004,
                         "first_token": 1.020, "replica_out": 1.022})
    t.mark("prefill_returned", 1.025)
    stages = t.stages_ms()
    assert stages["to_prefill_engine"] == pytest.approx(4.0)
    assert [stages[s] for s in ("to_prefill_replica", "prefill_frontend", "to_prefill_core")] \
        == pytest.approx([2.0, 1.0, 1.0])
    assert stages["prefill_reply"] == pytest.approx(
        stages["prefill_response"] + stages["from_prefill_replica"])


def test_detail_stages_split_decode_admission():
    t = HandoffTimeline()
    t.mark("prefill_returned", 2.000)
    t.engine("decode", {"replica_in": 2.001, "generate_in": 2.0015, "queued": 2.005})
    stages = t.stages_ms()
    assert [stages[s] for s in ("decode_frontend", "to_decode_core")] == pytest.approx(
        [1.5, 3.5])
    assert stages["decode_admission"] == pytest.approx(
        stages["decode_frontend"] + stages["to_decode_core"])


def test_router_marks_split_the_time_before_the_front():
    t = HandoffTimeline()
    t.mark("router_in", 0.995)
    t.mark("router_out", 0.997)
    t.mark("received", 1.000)
    stages = t.stages_ms()
    assert stages["router"] == pytest.approx(2.0)
    assert stages["router_to_front"] == pytest.approx(3.0)
    assert "router" not in HandoffTimeline(marks={"received": 1.0}).stages_ms()

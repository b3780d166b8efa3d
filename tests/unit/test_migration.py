"""Migration logic (app.migration) with fake engines and peers: no Ray, no vLLM."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from app.engine_protocol import KIND_JSON, KIND_STREAM, Head
from app.migration import (
    DONE,
    ContinuationFormatter,
    EngineLost,
    Migrator,
    TokenLedger,
    continuation_body,
    migratable,
    parse_event,
)

# --- the ledger -----------------------------------------------------------------------------


@dataclass
class Out:
    token_ids: list[int]
    text: str | None = None  # None: an engine output without detokenized text


@dataclass
class ReqOut:
    prompt_token_ids: list[int]
    outputs: list[Out]


@dataclass
class Params:
    delta: bool = True


def _engine(deltas: list[list[int]], fail_after: int | None = None):
    async def generate(prompt, params, request_id, **kw):
        for i, ids in enumerate(deltas):
            if fail_after is not None and i == fail_after:
                raise RuntimeError("EngineDeadError")
            yield ReqOut([1, 2, 3], [Out(ids)])
    return generate


async def _drain(gen) -> list:
    out = []
    try:
        async for x in gen:
            out.append(x)
    except RuntimeError:
        pass
    return out


def test_ledger_forgets_finished_requests_and_keeps_failed_ones():
    ledger = TokenLedger()
    gen = ledger.wrap(_engine([[10], [11, 12]]), lambda p: p.delta)
    asyncio.run(_drain(gen("p", Params(), "cmpl-abc-0")))
    assert len(ledger) == 0
    gen = ledger.wrap(_engine([[10], [11, 12], [13]], fail_after=2), lambda p: p.delta)
    asyncio.run(_drain(gen("p", Params(), "cmpl-xyz-0")))
    assert ledger.take("xyz") == ([1, 2, 3], [10, 11, 12], 3)
    assert ledger.take("xyz") is None and len(ledger) == 0


def test_ledger_cumulative_outputs_replace():
    ledger = TokenLedger()
    gen = ledger.wrap(_engine([[10], [10, 11]], fail_after=None), lambda p: False)

    async def first_two():
        it = gen("p", Params(False), "r1")
        await anext(it)
        await anext(it)
        return ledger.take("r1")

    assert asyncio.run(first_two()) == ([1, 2, 3], [10, 11], 2)


def test_ledger_drops_cancelled_requests():
    ledger = TokenLedger()
    gen = ledger.wrap(_engine([[1], [2], [3]]), lambda p: True)

    async def leave_early():
        it = gen("p", Params(), "r")
        await anext(it)
        await it.aclose()

    asyncio.run(leave_early())
    assert len(ledger) == 0


def test_ledger_counts_only_tokens_whose_text_was_sent():
    """vLLM's detokenizer holds back a token that is one byte of a longer UTF-8 character
    (empty text, or U+FFFD): such trailing tokens are not "whole"."""
    async def generate(prompt, params, request_id, **kw):
        for ids, text in ([10], "a"), ([11], ""), ([12], "\ufffd"):
            yield ReqOut([1], [Out(ids, text)])
        raise RuntimeError("EngineDeadError")

    ledger = TokenLedger()
    asyncio.run(_drain(ledger.wrap(generate, lambda p: True)("p", Params(), "r")))
    assert ledger.take("r") == ([1], [10, 11, 12], 1)


def test_ledger_whole_text_from_cumulative_outputs():
    async def generate(prompt, params, request_id, **kw):
        for ids, text in ([10], "a"), ([10, 11], "a"), ([10, 11, 12], "a\u00e9"), \
                ([10, 11, 12, 13], "a\u00e9"):
            yield ReqOut([1], [Out(ids, text)])
        raise RuntimeError("EngineDeadError")

    ledger = TokenLedger()
    asyncio.run(_drain(ledger.wrap(generate, lambda p: False)("p", Params(False), "r")))
    assert ledger.take("r") == ([1], [10, 11, 12, 13], 3)


# --- continuation requests and chunk rewriting ----------------------------------------------


def test_continuation_keeps_sampling_and_budget():
    body = {"model": "m", "prompt": "hi", "max_tokens": 10, "temperature": 0, "seed": 7,
            "min_tokens": 4, "stop": None, "n": 1, "logprobs": 2, "top_k": None}
    cont = continuation_body("completion", body, [1, 2], [5, 6, 7], "m")
    assert cont["prompt"] == [1, 2, 5, 6, 7] and cont["max_tokens"] == 7
    assert cont["min_tokens"] == 1 and cont["temperature"] == 0 and cont["seed"] == 7
    assert cont["logprobs"] == 2 and "top_k" not in cont
    assert cont["stream"] is True and cont["return_token_ids"] is True
    chat = continuation_body("chat", {"max_completion_tokens": 4, "max_tokens": 99,
                                      "logprobs": True}, [1], [2], "m")
    assert chat["max_tokens"] == 3 and "logprobs" not in chat
    assert "max_tokens" not in continuation_body("chat", {}, [1], [2], "m")


def test_what_cannot_migrate():
    assert migratable("completion", {"n": 1}) is None
    assert migratable("completion", {"n": 2})
    assert migratable("completion", {"stop": ["\n"]}) == "stop strings"
    assert migratable("chat", {"tools": [{"type": "function"}]})


def _chunk(text: str, ids: list[int], finish=None) -> dict:
    return {"id": "cmpl-peer", "object": "text_completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "text": text, "token_ids": ids, "logprobs": None,
                         "finish_reason": finish}]}


def test_formatter_rewrites_into_the_original_completion_stream():
    fmt = ContinuationFormatter("completion", {"id": "cmpl-orig", "created": 42,
                                               "model": "m"}, "m", 5, 3, True)
    event, ids = fmt.convert(_chunk(" b", [9]))
    data = parse_event(event)
    assert ids == [9] and data["id"] == "cmpl-orig" and data["created"] == 42
    assert data["choices"][0]["text"] == " b" and "token_ids" not in data["choices"][0]
    usage, _ = fmt.convert({"choices": [], "usage": {"prompt_tokens": 8,
                                                     "completion_tokens": 2}})
    assert parse_event(usage)["usage"] == {"prompt_tokens": 5, "completion_tokens": 5,
                                           "total_tokens": 10}
    with_ids = ContinuationFormatter("completion", None, "m", 5, 3, False, token_ids=True)
    assert parse_event(with_ids.convert(_chunk(" b", [9]))[0])["choices"][0]["token_ids"] == [9]
    quiet = ContinuationFormatter("completion", None, "m", 5, 3, False)
    assert quiet.convert({"choices": [], "usage": {"completion_tokens": 2}})[0] is None


def test_formatter_rewrites_completion_chunks_as_chat_deltas():
    fmt = ContinuationFormatter("chat", {"id": "chatcmpl-o", "created": 7, "model": "m"},
                                "m", 5, 1, False)
    data = parse_event(fmt.convert(_chunk("x", [3], "length"))[0])
    assert data["object"] == "chat.completion.chunk" and data["id"] == "chatcmpl-o"
    assert data["choices"][0]["delta"] == {"content": "x"}
    assert data["choices"][0]["finish_reason"] == "length"


# --- the migrator over fake streams ----------------------------------------------------------


@dataclass
class Request:
    body: dict[str, Any]
    kv_transfer_params: Any = None

    def model_dump(self, exclude_unset: bool = False) -> dict[str, Any]:
        return dict(self.body)

    def model_copy(self, update: dict[str, Any]) -> Request:
        return Request(dict(self.body), update.get("kv_transfer_params"))


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


@dataclass
class Peers:
    """Peer calls in order: each a list of SSE events, or an exception to raise first."""

    plans: list[Any]
    calls: list[tuple[str, Any]] = field(default_factory=list)

    def __call__(self, kind: str, request: Any):
        self.calls.append((kind, request))
        plan = self.plans.pop(0)

        async def stream():
            if isinstance(plan, BaseException):
                raise plan
            if isinstance(plan, Head):
                yield plan
                return
            yield Head(KIND_STREAM)
            for item in plan:
                if isinstance(item, BaseException):
                    raise item
                yield item
        return stream()


def _local(chunks: list[str], lost: EngineLost):
    async def stream():
        for c in chunks:
            yield c
        raise lost
    return stream()


def _run(gen) -> list[str]:
    async def collect():
        return [c async for c in gen]
    return asyncio.run(collect())


def _migrator(peers: Peers, **kw) -> Migrator:
    return Migrator(peers, lambda kind, body: body, "m", retry_delay_s=0, **kw)


ORIG = {"id": "cmpl-orig", "object": "text_completion", "created": 42, "model": "m",
        "choices": [{"index": 0, "text": "a", "logprobs": None, "finish_reason": None}]}


def test_stream_continues_on_a_peer_with_one_usage_and_done():
    peers = Peers([[_sse(_chunk(" b", [21])), _sse(_chunk(" c", [22], "length")),
                    _sse({"choices": [], "usage": {"prompt_tokens": 4,
                                                   "completion_tokens": 2}}), DONE]])
    req = Request({"max_tokens": 3, "temperature": 0,
                   "stream_options": {"include_usage": True}})
    out = _run(_migrator(peers).guard("completion", req, _local(
        [_sse(ORIG)], EngineLost([1, 2], [20]))))
    events = [parse_event(c) for c in out]
    assert out[-1] == DONE and out.count(DONE) == 1
    assert [e["choices"][0]["text"] for e in events[:3]] == ["a", " b", " c"]
    assert {e["id"] for e in events[:-1]} == {"cmpl-orig"}
    assert events[3]["usage"] == {"prompt_tokens": 2, "completion_tokens": 3,
                                  "total_tokens": 5}
    kind, cont = peers.calls[0]
    assert kind == "completion" and cont["prompt"] == [1, 2, 20] and cont["max_tokens"] == 2


def test_stream_lost_mid_character_continues_after_its_last_whole_text():
    """Tokens 21 and 22 are the two bytes of one character: the client got their ids but
    no text. The peer continues after token 20, regenerates them with their text, and the
    client gets each token id once."""
    peers = Peers([[_sse(_chunk("\u00e9", [21, 22])), _sse(_chunk(" c", [23], "length")),
                    _sse({"choices": [], "usage": {"prompt_tokens": 3,
                                                   "completion_tokens": 3}}), DONE]])
    req = Request({"max_tokens": 4, "return_token_ids": True,
                   "stream_options": {"include_usage": True}})
    out = _run(_migrator(peers).guard("completion", req, _local(
        [_sse(ORIG)], EngineLost([1, 2], [20, 21, 22], whole=1))))
    events = [parse_event(c) for c in out[1:-1]]
    assert peers.calls[0][1]["prompt"] == [1, 2, 20] and peers.calls[0][1]["max_tokens"] == 3
    assert [e["choices"][0]["text"] for e in events[:2]] == ["\u00e9", " c"]
    assert [e["choices"][0]["token_ids"] for e in events[:2]] == [[], [23]]
    assert events[2]["usage"]["completion_tokens"] == 4


def test_peer_dying_mid_character_is_continued_from_the_last_whole_text_again():
    peers = Peers([[_sse(_chunk("", [21])), RuntimeError("peer died")],
                   [_sse(_chunk("\u00e9", [21, 22])), _sse(_chunk(" c", [23], "length")),
                    DONE]])
    out = _run(_migrator(peers).guard(
        "completion", Request({"max_tokens": 4, "return_token_ids": True}),
        _local([_sse(ORIG)], EngineLost([1], [20, 21, 22], whole=1))))
    assert peers.calls[1][1]["prompt"] == [1, 20]
    texts = [parse_event(c)["choices"][0]["text"] for c in out[1:-1]]
    ids = [parse_event(c)["choices"][0]["token_ids"] for c in out[1:-1]]
    assert "".join(texts) == "\u00e9 c" and sum(ids, []) == [23]


def test_peer_dying_mid_continuation_is_continued_again_from_all_tokens():
    peers = Peers([[_sse(_chunk(" b", [21])), RuntimeError("peer died")],
                   [_sse(_chunk(" c", [22], "length")), DONE]])
    out = _run(_migrator(peers).guard("completion", Request({"max_tokens": 3}), _local(
        [_sse(ORIG)], EngineLost([1], [20]))))
    assert [parse_event(c)["choices"][0]["text"] for c in out[:-1]] == ["a", " b", " c"]
    assert peers.calls[1][1]["prompt"] == [1, 20, 21]
    assert peers.calls[1][1]["max_tokens"] == 1


def test_bounded_migrations_end_in_a_clean_error_event():
    peers = Peers([[_sse(_chunk(" b", [21])), RuntimeError("x")],
                   [_sse(_chunk(" c", [22])), RuntimeError("y")]])
    out = _run(_migrator(peers, max_migrations=2).guard(
        "completion", Request({"max_tokens": 9}), _local([_sse(ORIG)], EngineLost([1], [20]))))
    assert out[-1] == DONE and "error" in parse_event(out[-2])
    assert parse_event(out[-2])["error"]["code"] == 503


def test_peer_that_fails_before_output_does_not_use_up_migrations():
    peers = Peers([EngineLost(), EngineLost(), [_sse(_chunk(" b", [21], "stop")), DONE]])
    out = _run(_migrator(peers, max_migrations=1).guard(
        "completion", Request({}), _local([_sse(ORIG)], EngineLost([1], [20]))))
    assert [parse_event(c)["choices"][0]["text"] for c in out[:-1]] == ["a", " b"]


def test_unmigratable_stream_gets_an_error_event():
    out = _run(_migrator(Peers([])).guard(
        "completion", Request({"stop": ["x"]}), _local([_sse(ORIG)], EngineLost([1], [2]))))
    assert parse_event(out[0]) == ORIG and out[-1] == DONE
    assert "stop strings" in parse_event(out[1])["error"]["message"]


def test_chat_lost_before_its_first_chunk_starts_with_the_role():
    peers = Peers([[_sse(_chunk("hi", [5], "stop")), DONE]])
    out = _run(_migrator(peers).guard("chat", Request({}), _local([], EngineLost([1, 2], []))))
    first = parse_event(out[0])
    assert first["choices"][0]["delta"]["role"] == "assistant"
    assert parse_event(out[1])["choices"][0]["delta"] == {"content": "hi"}
    assert parse_event(out[1])["id"] == first["id"]


def test_request_the_engine_never_saw_is_rerun_whole():
    whole = Head(KIND_JSON, 200, {"choices": [{"text": "full"}]})
    peers = Peers([RuntimeError("landed on the dead one"), whole])
    head, chunks = asyncio.run(_migrator(peers).rerun("completion", Request(
        {"prompt": "p"}, kv_transfer_params={"remote": 1})))
    assert head is whole and chunks is None
    assert peers.calls[1][1].kv_transfer_params is None  # local prefill on the peer


def test_engine_lost_pickles_with_its_tokens():
    import pickle

    lost = pickle.loads(pickle.dumps(EngineLost([1, 2], [3, 4], whole=1)))
    assert isinstance(lost, EngineLost) and lost.prompt_ids == [1, 2]
    assert lost.generated_ids == [3, 4] and lost.whole == 1


@pytest.mark.parametrize("chunk", ["data: [DONE]\n\n", ": ping\n\n", "data: {bad"])
def test_parse_event_ignores_non_json(chunk):
    assert parse_event(chunk) is None

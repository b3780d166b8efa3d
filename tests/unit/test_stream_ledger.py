"""The separate front's own ledger of a relayed stream (app/stream_ledger.py) and the client
that turns a lost decode replica into EngineLost (app/engine_clients.RemoteDecodeClient).
Chunks are vLLM's as sent with ``return_token_ids``; fake handles stand in for Ray's."""

from __future__ import annotations

import asyncio
import json

import pytest
from pydantic import BaseModel

from app.engine_clients import HandleEngineClient, RemoteDecodeClient
from app.engine_protocol import KIND_JSON, KIND_STARTED, Head
from app.migration import DONE, EngineLost
from app.stream_ledger import StreamLedger
from tests.unit.test_engine_clients import FakeHandle


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def cmpl(text: str, ids: list[int], prompt_ids: list[int] | None = None,
         finish: str | None = None) -> str:
    return sse({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
                "choices": [{"index": 0, "text": text, "logprobs": None,
                             "finish_reason": finish, "stop_reason": None,
                             "prompt_token_ids": prompt_ids, "token_ids": ids}]})


def chat(delta: dict, ids: list[int] | None, prompt_ids: list[int] | None = None) -> str:
    return sse({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                "model": "m", "prompt_token_ids": prompt_ids,
                "choices": [{"index": 0, "delta": delta, "logprobs": None,
                             "finish_reason": None, "token_ids": ids}]})


USAGE = sse({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
             "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2,
                                      "total_tokens": 5}})


def data(chunk: str) -> dict:
    return json.loads(chunk[6:])


def test_completion_ids_recorded_and_hidden_from_a_client_that_did_not_ask():
    ledger = StreamLedger("completion", hide_ids=True)
    out = data(ledger.relay(cmpl(" a", [7], prompt_ids=[1, 2, 3])))
    assert out["choices"][0]["text"] == " a"
    assert out["choices"][0]["token_ids"] is None
    assert out["choices"][0]["prompt_token_ids"] is None
    ledger.relay(cmpl(" b", [8]))
    assert (ledger.prompt_ids, ledger.generated, ledger.whole) == ([1, 2, 3], [7, 8], 2)
    assert ledger.relay(USAGE) is not None and ledger.relay(DONE) == DONE


def test_a_held_back_byte_is_generated_but_not_whole():
    ledger = StreamLedger("completion", hide_ids=True)
    ledger.relay(cmpl(" caf", [5], prompt_ids=[1]))
    relayed = ledger.relay(cmpl("", [200]))  # first byte of 'é': its text held back
    assert data(relayed)["choices"][0]["text"] == ""  # vLLM sends it, so do we
    lost = ledger.lost()
    assert isinstance(lost, EngineLost)
    assert (lost.prompt_ids, lost.generated_ids, lost.whole) == ([1], [5, 200], 1)
    ledger.relay(cmpl("é", [169]))
    assert ledger.whole == 3


def test_a_client_that_asked_for_ids_gets_the_chunk_unchanged():
    ledger = StreamLedger("completion", hide_ids=False)
    chunk = cmpl(" a", [7], prompt_ids=[1, 2])
    assert ledger.relay(chunk) is chunk
    assert (ledger.prompt_ids, ledger.generated) == ([1, 2], [7])


def test_chat_prompt_ids_from_the_role_chunk_and_id_only_chunks_dropped():
    ledger = StreamLedger("chat", hide_ids=True)
    role = data(ledger.relay(chat({"role": "assistant", "content": ""}, None, [4, 5])))
    assert role["prompt_token_ids"] is None and role["choices"][0]["delta"]["role"]
    assert ledger.relay(chat({}, [300])) is None  # sent only because ids were asked for
    out = data(ledger.relay(chat({"content": "é"}, [301])))
    assert out["choices"][0]["delta"] == {"content": "é"}
    assert out["choices"][0]["token_ids"] is None
    assert (ledger.prompt_ids, ledger.generated, ledger.whole) == ([4, 5], [300, 301], 2)


def test_errors_and_done_pass_through():
    ledger = StreamLedger("chat", hide_ids=True)
    err = 'data: {"error": {"message": "x", "code": 503}}\n\n'
    assert ledger.relay(err) == err and ledger.relay(DONE) == DONE


class Req(BaseModel):
    stream: bool = True
    return_token_ids: bool | None = None


def client_with(outcome) -> tuple[RemoteDecodeClient, dict]:
    family: dict = {}
    handle = FakeHandle({"generate": outcome}, family=family)
    family[("outcomes", True)] = {"generate": outcome}
    return RemoteDecodeClient(HandleEngineClient(handle, "grpc")), family


async def drain(stream) -> list:
    out = []
    async for item in stream:
        out.append(item)
    return out


def test_replica_lost_mid_stream_is_engine_lost_with_what_the_client_has():
    head = Head("stream")
    client, family = client_with([head, cmpl(" a", [7], [1, 2]), cmpl("", [200]),
                                  ConnectionError("replica died")])
    got: list = []

    async def run():
        async for item in client.stream("completion", Req()):
            got.append(item)

    with pytest.raises(EngineLost) as lost:
        asyncio.run(run())
    assert got[0] is head and len(got) == 3
    assert data(got[1])["choices"][0]["token_ids"] is None  # hidden again
    assert (lost.value.prompt_ids, lost.value.generated_ids, lost.value.whole) == (
        [1, 2], [7, 200], 1)
    (_, (kind, sent), _), = family[(True, True)]
    assert kind == "completion" and sent.return_token_ids is True  # asked on its behalf


def test_replica_lost_before_answering_is_engine_lost_with_nothing():
    client, _ = client_with([ConnectionError("replica died")])
    with pytest.raises(EngineLost) as lost:
        asyncio.run(drain(client.stream("completion", Req(stream=False))))
    assert lost.value.prompt_ids == [] and lost.value.generated_ids == []


def test_a_stream_that_ends_normally_is_relayed_whole():
    head = Head("stream")
    client, _ = client_with([head, cmpl(" a", [7], [1]), USAGE, DONE])
    out = asyncio.run(drain(client.stream("completion", Req(return_token_ids=True))))
    assert out[0] is head and out[1:] == [cmpl(" a", [7], [1]), USAGE, DONE]


def test_a_whole_pushed_answer_reaches_the_separate_front_after_its_mark():
    """A decode replica marks a whole pushed answer's token 1 before the answer
    (app.engine_host): both Heads cross to a front deployed on its own, in order."""
    mark, answer = Head(KIND_STARTED), Head(KIND_JSON, 200, {"choices": []})
    client, _ = client_with([mark, answer])
    assert asyncio.run(drain(client.stream("completion", Req(stream=False)))) == [mark, answer]

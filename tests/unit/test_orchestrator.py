"""The P/D flow with fake engines: what reaches each engine, and which route is reported."""

import asyncio

import pytest
from pydantic import BaseModel

from app.engine_protocol import KIND_ERROR, KIND_JSON, KIND_STREAM, Head
from app.orchestrator import PDOrchestrator
from app.pd_decision import Route


class FakeCompletion(BaseModel):
    """The fields of vLLM's CompletionRequest the flow reads or rewrites."""

    model: str | None = "m"
    prompt: str = "hello"
    max_tokens: int | None = 16
    min_tokens: int = 0
    n: int | None = 1
    stream: bool = False
    stream_options: dict | None = None
    echo: bool = False
    use_beam_search: bool = False
    kv_transfer_params: dict | None = None


KV = {"remote_engine_id": "p0", "remote_block_ids": [[1, 2]], "do_remote_prefill": True}


class FakeEngine:
    def __init__(self, once=None, stream_items=None, raises=None, delay=0.0):
        self.once = once or Head(KIND_JSON, 200, {"kv_transfer_params": KV})
        self.stream_items = stream_items or [Head(KIND_STREAM), "data: a\n\n", "data: [DONE]\n\n"]
        self.raises = raises
        self.delay = delay
        self.requests = []
        self.closed = False

    async def call_once(self, kind, request, **routing):
        self.requests.append(request)
        self.routing = routing
        await asyncio.sleep(self.delay)
        if self.raises:
            raise self.raises
        return self.once

    async def stream(self, kind, request):
        self.requests.append(request)
        try:
            for item in self.stream_items:
                yield item
        finally:
            self.closed = True


async def _collect(reply):
    return [chunk async for chunk in reply.chunks]


async def test_disaggregated_hands_prefill_params_to_decode():
    prefill, decode = FakeEngine(), FakeEngine()
    reply = await PDOrchestrator("disaggregated", decode, prefill).handle(
        "completion", FakeCompletion(stream=True, stream_options={"include_usage": True})
    )
    assert reply.route is Route.DISAGGREGATED
    sent = prefill.requests[0]
    assert sent.max_tokens == 1 and sent.stream is False and sent.stream_options is None
    assert sent.kv_transfer_params["do_remote_decode"] is True
    assert decode.requests[0].kv_transfer_params == KV
    assert decode.requests[0].max_tokens == 16 and decode.requests[0].stream is True
    assert await _collect(reply) == ["data: a\n\n", "data: [DONE]\n\n"]


async def test_client_cannot_inject_kv_transfer_params():
    prefill, decode = FakeEngine(), FakeEngine()
    evil = {"do_remote_prefill": True, "remote_engine_id": "someone-else"}
    await PDOrchestrator("disaggregated", decode, prefill).handle(
        "completion", FakeCompletion(kv_transfer_params=evil)
    )
    assert prefill.requests[0].kv_transfer_params["do_remote_decode"] is True
    assert decode.requests[0].kv_transfer_params == KV


@pytest.mark.parametrize(
    "prefill",
    [
        FakeEngine(raises=RuntimeError("replica died")),
        FakeEngine(once=Head(KIND_ERROR, 500, {"error": {"message": "boom"}})),
        FakeEngine(once=Head(KIND_JSON, 200, {"kv_transfer_params": None})),
    ],
    ids=["exception", "server-error", "no-params"],
)
async def test_prefill_failure_falls_back_to_local_prefill(prefill):
    decode = FakeEngine()
    reply = await PDOrchestrator("disaggregated", decode, prefill).handle(
        "completion", FakeCompletion()
    )
    assert reply.route is Route.FALLBACK
    assert decode.requests[0].kv_transfer_params is None


async def test_prefill_timeout_falls_back():
    prefill, decode = FakeEngine(delay=5.0), FakeEngine()
    orch = PDOrchestrator("disaggregated", decode, prefill, prefill_timeout_s=0.05)
    reply = await orch.handle("completion", FakeCompletion())
    assert reply.route is Route.FALLBACK
    assert len(decode.requests) == 1


async def test_client_error_from_prefill_is_returned_not_retried():
    err = Head(KIND_ERROR, 400, {"error": {"message": "prompt too long", "code": 400}})
    prefill, decode = FakeEngine(once=err), FakeEngine()
    reply = await PDOrchestrator("disaggregated", decode, prefill).handle(
        "completion", FakeCompletion()
    )
    assert reply.head is err and reply.chunks is None
    assert decode.requests == []


async def test_multi_sequence_requests_skip_prefill():
    prefill, decode = FakeEngine(), FakeEngine()
    reply = await PDOrchestrator("disaggregated", decode, prefill).handle(
        "completion", FakeCompletion(n=2)
    )
    assert reply.route is Route.AGGREGATED
    assert prefill.requests == []


async def test_aggregated_mode_uses_decode_engine_only():
    decode = FakeEngine()
    reply = await PDOrchestrator("aggregated", decode).handle("completion", FakeCompletion())
    assert reply.route is Route.AGGREGATED
    assert decode.requests[0].kv_transfer_params is None


async def test_timeline_of_a_request_one_engine_serves_whole(caplog):
    """With ``handoff.timeline`` on, an aggregated request logs its own stages (the baseline
    the handoff is compared with), read from the engine's marks of its request id."""
    import json
    import logging

    asked = []

    def probe(key):
        asked.append(key)
        return {"queued": 1.0, "scheduled": 1.5, "first_token": 2.0}, 0, None

    decode = FakeEngine(stream_items=[Head(KIND_STREAM), "data: a\n\n", "data: [DONE]\n\n"])
    orch = PDOrchestrator("aggregated", decode, timeline=probe)
    request = FakeCompletion(stream=True)
    with caplog.at_level(logging.INFO, logger="ray.serve"):
        reply = await orch.handle("completion", request)
        assert await _collect(reply) == ["data: a\n\n", "data: [DONE]\n\n"]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("pd_timeline")]
    assert len(lines) == 1
    record = json.loads(lines[0].split(" ", 1)[1])
    assert record["route"] == "aggregated" and asked == [""]
    stages = record["stages_ms"]
    assert stages["local_queue"] == 500.0 and stages["local_compute"] == 500.0
    assert "prefill_compute" not in stages and "first_chunk_ms" in stages


async def test_non_stream_reply_closes_engine_stream():
    body = Head(KIND_JSON, 200, {"choices": []})
    decode = FakeEngine(stream_items=[body])
    reply = await PDOrchestrator("aggregated", decode).handle("completion", FakeCompletion())
    assert reply.head is body and reply.chunks is None
    assert decode.closed


# --- the KV router's choices (x-serve-router-* headers, parsed into a RouteHint) -------------


async def test_router_local_prefill_skips_the_prefill_engine():
    from app.routing.hints import RouteHint
    from app.routing.policy import PrefillPlan

    prefill, decode = FakeEngine(), FakeEngine()
    orch = PDOrchestrator("disaggregated", decode, prefill)
    hint = RouteHint(PrefillPlan.LOCAL_CACHED, None, 300, 256)
    reply = await orch.handle("completion", FakeCompletion(stream=True), hint)
    assert reply.route is Route.LOCAL_PREFILL_CACHED
    assert reply.route.value == "local-prefill:cached"
    assert prefill.requests == []
    assert decode.requests[0].kv_transfer_params is None
    await _collect(reply)


async def test_router_prefill_choice_reaches_the_prefill_call():
    from app.routing.hints import RouteHint
    from app.routing.policy import PrefillPlan

    prefill, decode = FakeEngine(), FakeEngine()
    orch = PDOrchestrator("disaggregated", decode, prefill)
    hint = RouteHint(PrefillPlan.REMOTE, "SERVE_REPLICA::pd#PrefillServer#abc", 300, 64)
    reply = await orch.handle("completion", FakeCompletion(), hint)
    assert reply.route is Route.DISAGGREGATED
    assert prefill.routing == {"prefill_replica": "SERVE_REPLICA::pd#PrefillServer#abc",
                               "prompt_tokens": 300, "predicted_cached_tokens": 64}
    assert decode.requests[0].kv_transfer_params == KV


async def test_router_plan_does_not_override_forking_requests():
    from app.routing.hints import RouteHint
    from app.routing.policy import PrefillPlan

    prefill, decode = FakeEngine(), FakeEngine()
    orch = PDOrchestrator("disaggregated", decode, prefill)
    reply = await orch.handle("completion", FakeCompletion(n=2),
                              RouteHint(PrefillPlan.LOCAL_SHORT, None, 10, 0))
    assert reply.route is Route.AGGREGATED


class DyingEngine(FakeEngine):
    """Its engine dies: at once (nothing sent), or after ``after`` chunks."""

    def __init__(self, after=None, lost=None):
        super().__init__()
        self.after, self.lost = after, lost

    async def stream(self, kind, request):
        from app.migration import EngineLost

        self.requests.append(request)
        if self.after is None:
            raise self.lost or EngineLost()
        yield Head(KIND_STREAM)
        for i in range(self.after):
            yield f'data: {{"id": "cmpl-o", "created": 1, "model": "m", "choices": ' \
                  f'[{{"index": 0, "text": "t{i}", "finish_reason": null}}]}}\n\n'
        raise self.lost or EngineLost([1, 2], list(range(10, 10 + self.after)))


def _migrator(peer_engine):
    from app.migration import Migrator

    def peer(kind, request):
        return peer_engine.stream(kind, request)

    return Migrator(peer, lambda kind, body: FakeCompletion(
        prompt=str(body["prompt"]), max_tokens=body.get("max_tokens")), "m", retry_delay_s=0)


async def test_decode_engine_lost_before_output_reruns_the_request_on_a_peer():
    peer = FakeEngine(stream_items=[Head(KIND_JSON, 200, {"choices": [{"text": "ok"}]})])
    orch = PDOrchestrator("disaggregated", DyingEngine(), FakeEngine(),
                          migrator=_migrator(peer))
    reply = await orch.handle("completion", FakeCompletion())
    assert reply.head.body == {"choices": [{"text": "ok"}]} and reply.chunks is None
    assert peer.requests[0].kv_transfer_params is None  # the peer prefills itself


async def test_decode_engine_lost_mid_stream_continues_on_a_peer():
    cont = ('data: {"id": "cmpl-p", "choices": [{"index": 0, "text": "u", "token_ids": [7], '
            '"finish_reason": "length"}]}\n\n')
    peer = FakeEngine(stream_items=[Head(KIND_STREAM), cont, "data: [DONE]\n\n"])
    orch = PDOrchestrator("aggregated", DyingEngine(after=2), migrator=_migrator(peer))
    reply = await orch.handle("completion", FakeCompletion(stream=True, max_tokens=3))
    chunks = await _collect(reply)
    assert [c.split('"text": "')[1][:2] if '"text": "' in c else c for c in chunks[:2]] == [
        "t0", "t1"]
    assert '"id":"cmpl-o"' in chunks[2] and '"text":"u"' in chunks[2]
    assert chunks[-1] == "data: [DONE]\n\n"
    assert peer.requests[0].prompt == str([1, 2, 10, 11])
    assert peer.requests[0].max_tokens == 1


async def test_without_a_migrator_engine_loss_propagates():
    from app.migration import EngineLost

    with pytest.raises(EngineLost):
        await PDOrchestrator("aggregated", DyingEngine()).handle("completion", FakeCompletion())


# --- token 1 from prefill (app.handoff.first_token) ------------------------------------------

class FakeRequestModel(BaseModel):
    """What ``to_request`` builds: any body, kept as given."""

    model_config = {"extra": "allow"}
    request_id: str = "cont-1"


def _prefill_answer(prompt_ids, finish="length"):
    return Head(KIND_JSON, 200, {
        "id": "cmpl-p", "created": 7, "model": "m", "kv_transfer_params": KV,
        "choices": [{"text": " one", "token_ids": [41], "prompt_token_ids": prompt_ids,
                     "finish_reason": finish}]})


def _fast(decode, prefill, block_size=32):
    from app.orchestrator import FirstTokenPath

    path = FirstTokenPath(lambda kind, body: FakeRequestModel(**body), "m", block_size)
    return PDOrchestrator("disaggregated", decode, prefill, first_token=path)


def _data(chunk):
    import json

    return json.loads(chunk[len("data: "):])


async def test_token_one_from_prefill_is_sent_before_decode_continues_after_it():
    prefill = FakeEngine(once=_prefill_answer(list(range(40))))
    decode = FakeEngine(stream_items=[
        Head(KIND_STREAM),
        'data: {"id":"cmpl-d","choices":[{"index":0,"text":" two","token_ids":[42],'
        '"finish_reason":"length"}]}\n\n',
        'data: {"id":"cmpl-d","choices":[],"usage":{"prompt_tokens":41,'
        '"completion_tokens":1}}\n\n',
        "data: [DONE]\n\n"])
    reply = await _fast(decode, prefill).handle("completion", FakeCompletion(
        stream=True, max_tokens=2, stream_options={"include_usage": True}))
    assert reply.route is Route.DISAGGREGATED
    assert prefill.requests[0].min_tokens == 0
    chunks = await _collect(reply)
    cont = decode.requests[0]
    assert cont.prompt == list(range(40)) + [41] and cont.max_tokens == 1
    assert cont.kv_transfer_params == KV
    first, second, usage = (_data(c) for c in chunks[:3])
    assert first["choices"][0]["text"] == " one" and first["id"] == "cmpl-p"
    assert second["choices"][0]["text"] == " two" and second["id"] == "cmpl-p"
    assert usage["usage"] == {"prompt_tokens": 40, "completion_tokens": 2, "total_tokens": 42}
    assert chunks[3:] == ["data: [DONE]\n\n"] and decode.closed


async def test_block_aligned_prompt_or_eos_token_one_takes_the_usual_path():
    for answer in (_prefill_answer(list(range(64))), _prefill_answer(list(range(40)), "stop")):
        prefill, decode = FakeEngine(once=answer), FakeEngine()
        reply = await _fast(decode, prefill).handle("completion", FakeCompletion(stream=True))
        assert decode.requests[0].prompt == "hello"  # the client's request, decode samples
        assert decode.requests[0].kv_transfer_params == KV
        assert await _collect(reply) == ["data: a\n\n", "data: [DONE]\n\n"]


async def test_decode_refusing_the_continuation_ends_the_stream_with_an_error_event():
    refusing = FakeEngine(stream_items=[Head(KIND_ERROR, 400, {"error": {"message": "no"}})])
    prefill = FakeEngine(once=_prefill_answer(list(range(40))))
    reply = await _fast(refusing, prefill).handle("completion", FakeCompletion(stream=True))
    chunks = await _collect(reply)
    assert _data(chunks[0])["choices"][0]["text"] == " one"
    assert "refused" in _data(chunks[1])["error"]["message"]
    assert chunks[2:] == ["data: [DONE]\n\n"]


async def test_client_gone_after_token_one_closes_the_decode_stream():
    """Closing the decode stream after its Head is what releases prefill's blocks
    (app.engine_protocol.stream_after_head)."""
    prefill, decode = FakeEngine(once=_prefill_answer(list(range(40)))), FakeEngine()
    reply = await _fast(decode, prefill).handle("completion", FakeCompletion(stream=True))
    first = await anext(reply.chunks)
    assert _data(first)["choices"][0]["text"] == " one"
    await asyncio.sleep(0.01)  # decode opened meanwhile
    await reply.chunks.aclose()
    assert decode.requests and decode.closed


async def test_prompt_with_no_room_after_token_one_takes_the_usual_path():
    from app.orchestrator import FirstTokenPath

    path = FirstTokenPath(lambda kind, body: FakeRequestModel(**body), "m", 32, 41)
    prefill, decode = FakeEngine(once=_prefill_answer(list(range(40)))), FakeEngine()
    orch = PDOrchestrator("disaggregated", decode, prefill, first_token=path)
    reply = await orch.handle("completion", FakeCompletion(stream=True))
    assert await _collect(reply) == ["data: a\n\n", "data: [DONE]\n\n"]
    assert decode.requests[0].prompt == "hello"


async def test_non_streamed_requests_keep_the_usual_path():
    prefill = FakeEngine(once=_prefill_answer(list(range(40))))
    decode = FakeEngine(stream_items=[Head(KIND_JSON, 200, {"choices": []})])
    reply = await _fast(decode, prefill).handle("completion", FakeCompletion(stream=False))
    assert reply.head.kind == KIND_JSON and decode.requests[0].prompt == "hello"

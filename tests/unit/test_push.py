"""Push transfers with early decode admission (app/handoff/push.py, the orchestrator's push
flow) with fake engines: what each leg carries, and every way a push is abandoned."""

import asyncio

import pytest

from app.config import AppConfig
from app.engine_protocol import KIND_ERROR, KIND_JSON, KIND_STARTED, KIND_STREAM, Head
from app.handoff.prefill_plane import PlanePool
from app.handoff.push import PushTarget, decode_push_params
from app.migration import EngineLost
from app.orchestrator import PDOrchestrator
from app.pd_decision import Route
from tests.unit.test_orchestrator import FakeCompletion, FakeEngine

TARGET = PushTarget("replica-p1", "engine-p1", "10.0.0.5", 5600, 1)
ANSWER = Head(KIND_JSON, 200, {"kv_transfer_params": {"do_remote_decode": True}})


class Completion(FakeCompletion):
    request_id: str | None = None


class PushedDecode:
    """A decode engine whose pushed requests (``do_remote_prefill``) produce their first
    chunk ``kv_after`` seconds after being asked (None: never); others answer at once."""

    def __init__(self, kv_after: float | None = 0.05, head: Head | None = None,
                 first: str = "data: a\n\n"):
        self.kv_after = kv_after
        self.head = head or Head(KIND_STREAM)
        self.first = first
        self.requests = []
        self.closed = []

    async def stream(self, kind, request):
        self.requests.append(request)
        pushed = bool((request.kv_transfer_params or {}).get("do_remote_prefill"))
        try:
            yield self.head if pushed else Head(KIND_STREAM)
            if pushed:
                if self.kv_after is None:
                    await asyncio.Event().wait()
                await asyncio.sleep(self.kv_after)
            yield self.first if pushed else "data: a\n\n"
            yield "data: [DONE]\n\n"
        finally:
            self.closed.append(pushed)


class SlowPrefill(FakeEngine):
    """A prefill leg that answers after ``seconds``; ``answered`` or ``cancelled`` is set by
    how it ended on the engine."""

    def __init__(self, seconds: float = 0.3):
        super().__init__()
        self.seconds = seconds
        self.answered, self.cancelled = asyncio.Event(), asyncio.Event()

    async def call_once(self, kind, request, **routing):
        try:
            await asyncio.sleep(self.seconds)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        self.answered.set()
        return ANSWER


class WholeDecode:
    """A decode engine answering whole requests: a pushed one puts out token 1 ``kv_after``
    seconds after being asked (None: never), marked as ``EngineHost.generate`` marks it,
    and answers ``gen_s`` after that."""

    def __init__(self, kv_after: float | None, gen_s: float = 0.0):
        self.kv_after, self.gen_s = kv_after, gen_s
        self.requests, self.closed = [], []

    async def stream(self, kind, request):
        self.requests.append(request)
        pushed = bool((request.kv_transfer_params or {}).get("do_remote_prefill"))
        try:
            if pushed:
                if self.kv_after is None:
                    await asyncio.Event().wait()
                await asyncio.sleep(self.kv_after)
                yield Head(KIND_STARTED)
                await asyncio.sleep(self.gen_s)
            yield Head(KIND_JSON, 200, {"choices": [{"text": "pushed" if pushed else "local"}]})
        finally:
            self.closed.append(pushed)


def _orchestrator(decode, prefill, target=TARGET, wait_s=5.0):
    return PDOrchestrator("disaggregated", decode, prefill, push_target=lambda hint: target,
                          push_wait_s=wait_s)


async def _collect(reply):
    return [chunk async for chunk in reply.chunks]


async def test_both_legs_leave_at_once_with_one_id_and_the_target_named():
    prefill, decode = FakeEngine(once=ANSWER, delay=0.02), PushedDecode()
    orch = _orchestrator(decode, prefill)
    reply = await orch.handle("completion", Completion(stream=True))
    assert reply.route is Route.DISAGGREGATED and reply.head.kind == KIND_STREAM
    assert await _collect(reply) == ["data: a\n\n", "data: [DONE]\n\n"]
    leg, pushed = prefill.requests[0], decode.requests[0]
    assert leg.request_id == pushed.request_id and leg.request_id
    assert leg.max_tokens == 1 and leg.stream is False
    assert leg.kv_transfer_params["do_remote_decode"] is True
    assert prefill.routing["prefill_replica"] == "replica-p1"
    assert pushed.kv_transfer_params == decode_push_params(TARGET, "completion",
                                                           pushed.request_id)
    assert pushed.max_tokens == 16 and pushed.stream is True
    assert orch.token_one_sources == {"prefill": 0, "decode": 1}
    assert len(decode.requests) == 1  # no second leg


async def test_decode_is_asked_before_prefill_answers():
    prefill, decode = FakeEngine(once=ANSWER, delay=0.3), PushedDecode(kv_after=0.0)
    task = asyncio.create_task(_orchestrator(decode, prefill).handle(
        "completion", Completion(stream=True)))
    await asyncio.sleep(0.1)
    assert len(decode.requests) == 1 and len(prefill.requests) == 1  # both already out
    await task


@pytest.mark.parametrize("prefill", [
    FakeEngine(raises=RuntimeError("replica died"), delay=0.02),
    FakeEngine(once=Head(KIND_ERROR, 500, {"error": {"message": "boom"}}), delay=0.02),
], ids=["exception", "server-error"])
async def test_a_failed_prefill_abandons_the_push_for_local_prefill(prefill):
    decode = PushedDecode(kv_after=None)  # the pushed KV never comes
    reply = await _orchestrator(decode, prefill).handle("completion", Completion(stream=True))
    assert reply.route is Route.FALLBACK
    assert await _collect(reply) == ["data: a\n\n", "data: [DONE]\n\n"]
    assert decode.closed[0] is True  # the pushed leg was cancelled, vLLM frees its blocks
    assert decode.requests[1].kv_transfer_params is None
    assert decode.requests[1].request_id is None  # the client's own request


async def test_a_client_error_from_prefill_is_returned():
    err = Head(KIND_ERROR, 400, {"error": {"message": "prompt too long", "code": 400}})
    decode = PushedDecode(kv_after=None)
    reply = await _orchestrator(decode, FakeEngine(once=err, delay=0.02)).handle(
        "completion", Completion(stream=True))
    assert reply.head is err and reply.chunks is None
    assert decode.closed == [True] and len(decode.requests) == 1


BAD_TOKEN = 'data: {"error": {"message": "Token id 9999 is out of vocabulary", "code": 400}}\n\n'


async def test_a_prompt_decode_rejects_as_an_event_is_prefills_4xx():
    """vLLM checks a stream's prompt only when it starts: decode's first chunk is an error
    event, while prefill answers the 400 the client must get."""
    err = Head(KIND_ERROR, 400, {"error": {"message": "out of vocabulary", "code": 400}})
    decode = PushedDecode(kv_after=0.0, first=BAD_TOKEN)
    reply = await _orchestrator(decode, FakeEngine(once=err, delay=0.05)).handle(
        "completion", Completion(stream=True))
    assert reply.head is err and reply.chunks is None
    assert decode.closed == [True]


async def test_a_pushed_leg_that_fails_before_token_one_is_retried_locally():
    decode = PushedDecode(kv_after=0.0, first=BAD_TOKEN.replace("Token id", "KV load"))
    reply = await _orchestrator(decode, FakeEngine(once=ANSWER)).handle(
        "completion", Completion(stream=True))
    assert reply.route is Route.FALLBACK
    assert await _collect(reply) == ["data: a\n\n", "data: [DONE]\n\n"]
    assert decode.requests[1].kv_transfer_params is None


async def test_a_decode_engine_lost_under_a_push_reruns_and_prefill_still_ends():
    class LostDecode(PushedDecode):
        async def stream(self, kind, request):
            if (request.kv_transfer_params or {}).get("do_remote_prefill"):
                self.requests.append(request)
                yield Head(KIND_STREAM)
                raise EngineLost()
            async for item in super().stream(kind, request):
                yield item

    decode, prefill = LostDecode(), SlowPrefill()
    reply = await _orchestrator(decode, prefill).handle("completion", Completion(stream=True))
    assert reply.route is Route.FALLBACK
    assert await _collect(reply) == ["data: a\n\n", "data: [DONE]\n\n"]
    assert decode.requests[1].kv_transfer_params is None
    await asyncio.wait_for(prefill.answered.wait(), 2.0)  # the prefill call is never aborted
    assert not prefill.cancelled.is_set()


async def test_kv_that_never_arrives_after_prefill_answered_falls_back():
    decode = PushedDecode(kv_after=None)
    reply = await _orchestrator(decode, FakeEngine(once=ANSWER), wait_s=0.05).handle(
        "completion", Completion(stream=True))
    assert reply.route is Route.FALLBACK
    assert await _collect(reply) == ["data: a\n\n", "data: [DONE]\n\n"]
    assert decode.closed[0] is True


async def test_a_whole_answer_whose_kv_never_arrives_falls_back_too():
    """A whole answer comes only at its end, so the wait is bounded by decode's mark of its
    token 1: none ``push_wait_s`` after prefill answered, and the pushed leg is cancelled
    for local prefill, as for a stream."""
    decode = WholeDecode(kv_after=None)
    orch = _orchestrator(decode, FakeEngine(once=ANSWER), wait_s=0.05)
    reply = await asyncio.wait_for(orch.handle("completion", Completion()), 5.0)
    assert reply.route is Route.FALLBACK and reply.head.body["choices"][0]["text"] == "local"
    assert decode.closed[0] is True
    assert decode.requests[1].kv_transfer_params is None
    assert orch.fallbacks == {"push_timeout": 1}


async def test_a_whole_answer_that_started_in_time_may_take_longer():
    decode = WholeDecode(kv_after=0.02, gen_s=0.4)  # token 1 in time, the answer 0.4 s later
    orch = _orchestrator(decode, FakeEngine(once=ANSWER), wait_s=0.1)
    reply = await orch.handle("completion", Completion())
    assert reply.route is Route.DISAGGREGATED
    assert reply.head.body["choices"][0]["text"] == "pushed"
    assert len(decode.requests) == 1 and orch.fallbacks == {}


async def test_no_known_prefill_replica_means_local_prefill_not_pull():
    prefill, decode = FakeEngine(once=ANSWER), PushedDecode()
    reply = await _orchestrator(decode, prefill, target=None).handle(
        "completion", Completion(stream=True))
    assert reply.route is Route.FALLBACK
    assert prefill.requests == []
    assert decode.requests[0].kv_transfer_params is None


async def test_a_whole_answer_is_returned_as_decode_gives_it():
    body = Head(KIND_JSON, 200, {"choices": [{"text": "abc"}]})
    prefill, decode = FakeEngine(once=ANSWER), PushedDecode(head=body)
    reply = await _orchestrator(decode, prefill).handle("completion", Completion())
    assert reply.route is Route.DISAGGREGATED and reply.head is body and reply.chunks is None
    assert decode.requests[0].kv_transfer_params["do_remote_prefill"] is True


async def test_a_client_gone_while_waiting_closes_decode_but_lets_prefill_push():
    # vLLM holds a cancelled decode leg's blocks until the KV registered for them arrives:
    # an aborted prefill would never WRITE it, and the blocks would stay held.
    decode, prefill = PushedDecode(kv_after=None), SlowPrefill()
    task = asyncio.create_task(_orchestrator(decode, prefill).handle(
        "completion", Completion(stream=True)))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert decode.closed == [True]
    await asyncio.wait_for(prefill.answered.wait(), 2.0)
    assert not prefill.cancelled.is_set()


async def test_a_prefill_past_its_timeout_falls_back_but_is_not_aborted():
    decode, prefill = PushedDecode(kv_after=None), SlowPrefill()
    orch = PDOrchestrator("disaggregated", decode, prefill, prefill_timeout_s=0.05,
                          push_target=lambda hint: TARGET)
    reply = await orch.handle("completion", Completion(stream=True))
    assert reply.route is Route.FALLBACK
    assert await _collect(reply) == ["data: a\n\n", "data: [DONE]\n\n"]
    assert decode.closed[0] is True
    await asyncio.wait_for(prefill.answered.wait(), 2.0)
    assert not prefill.cancelled.is_set()


async def test_a_pulled_prefill_past_its_timeout_is_aborted():
    prefill = SlowPrefill()
    orch = PDOrchestrator("disaggregated", PushedDecode(), prefill, prefill_timeout_s=0.05)
    reply = await orch.handle("completion", Completion(stream=True))
    assert reply.route is Route.FALLBACK
    await asyncio.wait_for(prefill.cancelled.wait(), 2.0)  # nothing waits on its KV


def test_push_target_is_read_from_the_plane_endpoint():
    endpoint = {"address": "a:1", "token": "t",
                "push": PushTarget.advertised("e", "h", 7, 2)}
    assert PushTarget.from_endpoint("r", endpoint) == PushTarget("r", "e", "h", 7, 2)
    assert PushTarget.from_endpoint("r", {"address": "a:1", "token": "t"}) is None
    assert PushTarget.from_endpoint("r", {"push": {"engine_id": "e"}}) is None
    pool = PlanePool()
    pool.update({"r1": {"prefill_plane": endpoint}, "r2": {"role": "prefill"}})
    assert pool.push_target() == PushTarget("r1", "e", "h", 7, 2)
    assert pool.push_target("r1").replica == "r1"
    assert PlanePool().push_target() is None


def test_decode_params_name_the_prefill_engine_and_its_request():
    params = decode_push_params(TARGET, "chat", "abc")
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    assert (params["remote_engine_id"], params["remote_host"], params["remote_port"],
            params["tp_size"]) == ("engine-p1", "10.0.0.5", 5600, 1)
    assert params["remote_request_id"] == "chatcmpl-abc"


def _config(**handoff):
    return {"model": {"path": "m", "served_model_name": "m"}, "mode": "disaggregated",
            "handoff": handoff}


def test_push_config_selects_the_push_connector_and_needs_the_plane():
    cfg = AppConfig.model_validate(_config(transfer="push"))
    assert cfg.push_transfer
    for role in ("prefill", "decode"):
        kv = cfg.engine_kwargs(role, "cpu")["kv_transfer_config"]
        assert kv["kv_connector"] == "NixlPushConnector"
    assert AppConfig.model_validate(_config()).engine_kwargs("decode", "cpu")[
        "kv_transfer_config"]["kv_connector"] == "NixlConnector"
    with pytest.raises(ValueError, match="prefill plane|prefill_plane"):
        AppConfig.model_validate(_config(transfer="push", prefill_plane=False))
    with pytest.raises(ValueError, match="prefill_plane"):
        AppConfig.model_validate({**_config(transfer="push"),
                                  "routing": {"policy": "prefix_affinity"}})

"""EngineHost's handling of decode legs, with fakes standing in for vLLM's AsyncLLM and
serving objects: the release of a leg abandoned before its engine saw it, and the mark a
pushed whole answer gets when its token 1 is out (the real engine's side:
tests/integration/test_push_transfer.py)."""

import asyncio
from types import SimpleNamespace

from app.engine_host import EngineHost
from app.engine_protocol import KIND_JSON, KIND_STARTED
from app.handoff.push import PushTarget, decode_push_params


class RecordingEngine:
    def __init__(self):
        self.rejected = []

    async def notify_kv_transfer_request_rejected(self, request_id, params):
        self.rejected.append((request_id, params))


def _host() -> EngineHost:
    host = EngineHost({}, "m")
    host.engine = RecordingEngine()
    return host


async def test_an_abandoned_pulled_leg_tells_prefill_to_free_its_blocks():
    host = _host()
    params = {"do_remote_prefill": True, "remote_block_ids": [1, 2], "remote_engine_id": "p"}
    await host._release_remote_prefill(SimpleNamespace(kv_transfer_params=params))
    assert [p for _, p in host.engine.rejected] == [params]


async def test_an_abandoned_pushed_leg_submits_nothing():
    """Before decode registered its blocks prefill holds nothing for the leg, and vLLM's
    push worker sends prefill nothing for a rejected request: the call was only a request
    the engine had to take and drop."""
    host = _host()
    params = decode_push_params(PushTarget("r", "p", "10.0.0.5", 5600, 1), "completion", "x")
    await host._release_remote_prefill(SimpleNamespace(kv_transfer_params=params))
    await host._release_remote_prefill(SimpleNamespace(kv_transfer_params=None))
    assert host.engine.rejected == []


class FakeProcessor:
    """The two maps of vLLM's OutputProcessor that ``EngineHost.output_started`` reads."""

    def __init__(self):
        self.external_req_ids, self.request_states = {}, {}

    def add(self, external: str, prefilling: bool = True):
        self.external_req_ids[external] = [f"{external}-int"]
        self.request_states[f"{external}-int"] = SimpleNamespace(is_prefilling=prefilling)


class SlowServing:
    """vLLM's serving object for completions: a whole answer after ``seconds``, token 1
    (as the output processor shows it) after ``first_s``."""

    def __init__(self, processor, first_s: float, seconds: float):
        self.processor, self.first_s, self.seconds = processor, first_s, seconds
        self.cancelled = False

    async def create_completion(self, request):
        self.processor.add(f"cmpl-{request.request_id}-0")
        try:
            await asyncio.sleep(self.first_s)
            self.processor.request_states[f"cmpl-{request.request_id}-0-int"].is_prefilling = False
            await asyncio.sleep(self.seconds - self.first_s)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        return SimpleNamespace(model_dump=lambda: {"choices": [{"text": "x"}]})


def _serving_host(first_s: float, seconds: float) -> EngineHost:
    host = _host()
    host.engine.output_processor = FakeProcessor()
    host._completion = SlowServing(host.engine.output_processor, first_s, seconds)
    return host


def _leg(params) -> SimpleNamespace:
    return SimpleNamespace(request_id="r1", stream=False, kv_transfer_params=params)


PUSHED = decode_push_params(PushTarget("r", "p", "10.0.0.5", 5600, 1), "completion", "r1")


async def test_a_pushed_whole_answer_is_marked_when_its_token_one_is_out():
    host = _serving_host(first_s=0.1, seconds=0.3)
    items = [item async for item in host.generate("completion", _leg(PUSHED))]
    assert [i.kind for i in items] == [KIND_STARTED, KIND_JSON]


async def test_a_pulled_or_plain_whole_answer_is_not_marked():
    for params in (None, {"do_remote_prefill": True, "remote_block_ids": [1]}):
        host = _serving_host(first_s=0.1, seconds=0.3)
        items = [item async for item in host.generate("completion", _leg(params))]
        assert [i.kind for i in items] == [KIND_JSON]


async def test_a_front_that_leaves_after_the_mark_aborts_the_request():
    host = _serving_host(first_s=0.05, seconds=5.0)
    items = host.generate("completion", _leg(PUSHED))
    assert (await anext(items)).kind == KIND_STARTED
    await items.aclose()
    await asyncio.sleep(0)
    assert host._completion.cancelled

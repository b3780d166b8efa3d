"""HandleEngineClient's transport choice: by value (gRPC) first, an actor call when the
request is over the gRPC message limit, nothing retried for any other failure. Fake handles
stand in for Ray's (pure logic)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from app.engine_clients import HandleEngineClient, too_large_for_grpc


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode):
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


class FakeResponse:
    def __init__(self, outcome):
        self.outcome, self.cancelled = outcome, False

    def __await__(self):
        async def run():
            if isinstance(self.outcome, BaseException):
                raise self.outcome
            return self.outcome
        return run().__await__()

    def cancel(self):
        self.cancelled = True


class FakeGenerator:
    def __init__(self, outcome):
        self.outcome, self.cancelled = outcome, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        if not self.outcome:
            raise StopAsyncIteration
        item = self.outcome.pop(0)
        if isinstance(item, BaseException):  # the stream breaks here
            raise item
        return item

    def cancel(self):
        self.cancelled = True


class FakeMethod:
    def __init__(self, handle, name):
        self.handle, self.name = handle, name

    def remote(self, *args, **kwargs):
        self.handle.calls.append((self.name, args, kwargs))
        outcome = self.handle.outcomes[self.name]
        if self.handle.stream:
            return FakeGenerator(list(outcome) if isinstance(outcome, list) else outcome)
        return FakeResponse(outcome)


class FakeHandle:
    """One handle 'kind' (by reference or by value), sharing a call log with its options."""

    def __init__(self, outcomes, by_value=False, stream=False, family=None):
        self.outcomes, self.by_value, self.stream = outcomes, by_value, stream
        self.family = family if family is not None else {}
        self.calls = self.family.setdefault((by_value, stream), [])

    def options(self, *, stream=None, _by_reference=None):
        by_value = self.by_value if _by_reference is None else not _by_reference
        outcomes = self.family.get(("outcomes", by_value), self.outcomes)
        return FakeHandle(outcomes, by_value, self.stream if stream is None else stream,
                          self.family)

    def __getattr__(self, name):
        return FakeMethod(self, name)


def handles(actor_outcomes, grpc_outcomes):
    family = {("outcomes", False): actor_outcomes, ("outcomes", True): grpc_outcomes}
    return FakeHandle(actor_outcomes, family=family), family


TOO_LARGE = FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED)


def test_too_large_is_only_resource_exhausted():
    assert too_large_for_grpc(TOO_LARGE)
    assert not too_large_for_grpc(FakeRpcError(grpc.StatusCode.UNAVAILABLE))
    assert not too_large_for_grpc(RuntimeError("x"))


def test_call_goes_by_value_when_grpc():
    handle, family = handles({"generate_once": "actor"}, {"generate_once": "grpc"})
    client = HandleEngineClient(handle, "grpc")
    assert asyncio.run(client.call_once("completion", {"p": 1}, prefill_replica="r1")) == "grpc"
    assert family[(True, False)] == [("generate_once", ("completion", {"p": 1}),
                                      {"prefill_replica": "r1"})]
    assert family[(False, False)] == []


def test_call_over_the_grpc_limit_is_resent_as_actor_call():
    handle, family = handles({"generate_once": "actor"}, {"generate_once": TOO_LARGE})
    assert asyncio.run(HandleEngineClient(handle).call_once("chat", {})) == "actor"
    assert len(family[(True, False)]) == 1 and len(family[(False, False)]) == 1


def test_other_grpc_failures_are_not_retried():
    down = FakeRpcError(grpc.StatusCode.UNAVAILABLE)
    handle, family = handles({"generate_once": "actor"}, {"generate_once": down})
    with pytest.raises(FakeRpcError):
        asyncio.run(HandleEngineClient(handle).call_once("chat", {}))
    assert family[(False, False)] == []


def test_actor_transport_never_uses_grpc():
    handle, family = handles({"generate_once": TOO_LARGE}, {"generate_once": "grpc"})
    with pytest.raises(FakeRpcError):
        asyncio.run(HandleEngineClient(handle, "actor").call_once("chat", {}))
    assert family.get((True, False), []) == []


async def collect(stream):
    return [item async for item in stream]


def test_stream_by_value_and_resent_when_too_large():
    handle, family = handles({"generate": ["a1", "a2"]}, {"generate": ["g1", "g2"]})
    assert asyncio.run(collect(HandleEngineClient(handle).stream("chat", {}))) == ["g1", "g2"]
    handle, family = handles({"generate": ["a1", "a2"]}, {"generate": TOO_LARGE})
    out = asyncio.run(collect(HandleEngineClient(handle).stream("chat", {}, exclude_replica="x")))
    assert out == ["a1", "a2"]
    assert family[(False, True)] == [("generate", ("chat", {}), {"exclude_replica": "x"})]


def test_stream_closed_early_cancels_the_request():
    handle, family = handles({"generate": ["a"]}, {"generate": ["g1", "g2", "g3"]})
    gens = []
    original = FakeMethod.remote

    def remote(self, *args, **kwargs):
        gen = original(self, *args, **kwargs)
        gens.append(gen)
        return gen

    async def take_one():
        stream = HandleEngineClient(handle).stream("chat", {})
        first = await anext(stream)
        await stream.aclose()
        return first

    FakeMethod.remote = remote
    try:
        assert asyncio.run(take_one()) == "g1"
    finally:
        FakeMethod.remote = original
    assert [g.cancelled for g in gens] == [True]

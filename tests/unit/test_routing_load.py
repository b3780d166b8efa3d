"""The router's load view: reports, bookings until a report covers them, heartbeats."""

import time

import pytest

from app.routing.hints import RouteHint, marks_header, read_route_hint
from app.routing.load import LoadBook
from app.routing.policy import PrefillPlan
from app.routing.publisher import InFlight, RequestTracker


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_bookings_add_to_the_report_until_a_later_report_covers_them():
    clock = Clock()
    book = LoadBook(stale_after_s=3, report_lag_s=0.05, clock=clock)
    book.add("r")
    book.report("r", {"running": 1, "queued_prefill_tokens": 10, "active_kv_blocks": 4,
                      "kv_usage": 0.25})
    book.book("r", prefill_tokens=100, kv_blocks=3)
    load = book.load("r")
    assert (load.running, load.queued_prefill_tokens, load.active_kv_blocks) == (2, 110, 7)
    assert load.kv_usage == 0.25
    clock.t += 0.01  # a report sent before the request could have arrived: booking stays
    book.report("r", {"running": 1})
    assert book.load("r").running == 2
    clock.t += 0.1  # now the replica's own count includes it
    book.report("r", {"running": 2})
    assert book.load("r").running == 2


def test_bookings_expire_without_reports():
    clock = Clock()
    book = LoadBook(booking_ttl_s=5, clock=clock)
    book.add("r")
    book.book("r", 10, 1)
    clock.t += 6
    assert book.load("r").running == 0


def test_heartbeat_decides_liveness():
    clock = Clock()
    book = LoadBook(stale_after_s=3, clock=clock)
    book.add("r")
    assert book.alive("r")  # grace before the first report
    clock.t += 4
    assert not book.alive("r")
    book.report("r", {})
    assert book.alive("r")
    book.mark_down("r")  # its socket dropped: out at once
    assert not book.alive("r")
    book.report("r", {})  # back (a reconnect, then a report)
    assert book.alive("r")
    book.remove("r")
    assert not book.alive("r") and book.load("r").running == 0
    book.report("r", {"running": 5})  # a late report of a removed replica is ignored
    assert not book.alive("r")


def test_route_hint_round_trip_and_garbage():
    headers = {"x-serve-router-plan": "disaggregated",
               "x-serve-router-prefill-replica": "SERVE_REPLICA::a#P#x",
               "x-serve-router-prompt-tokens": "300", "x-serve-router-cached-tokens": "64"}
    hint = read_route_hint(headers)
    assert hint == RouteHint(PrefillPlan.REMOTE, "SERVE_REPLICA::a#P#x", 300, 64)
    assert not hint.local_prefill
    assert read_route_hint({"x-serve-router-plan": "local-prefill:short"}).local_prefill
    assert read_route_hint({"x-serve-router-plan": "nonsense"}) == RouteHint()
    assert read_route_hint({"x-serve-router-prompt-tokens": "x"}) == RouteHint()
    assert read_route_hint({}) == RouteHint()


def test_route_hint_carries_the_routers_timeline_marks():
    marked = read_route_hint({"x-serve-router-plan": "disaggregated",
                              "x-serve-router-marks": marks_header(12.5, 12.5015)})
    assert marked.router_marks == pytest.approx((12.5, 12.5015))
    assert marked.plan is PrefillPlan.REMOTE
    for garbage in ("", "1.0", "a,b", "1,2,3"):
        assert read_route_hint({"x-serve-router-marks": garbage}).router_marks is None


async def test_tracker_counts_prefill_until_first_chunk_and_records_predictions():
    changes, recorded, expected = [], [], {}
    inflight = InFlight(on_change=lambda: changes.append(1))
    tracker = RequestTracker(inflight, "decode", lambda rid, cb: expected.__setitem__(rid, cb),
                             lambda *a: recorded.append(a))

    class Req:
        request_id = "abc"

    tracked = tracker.begin(Req(), RouteHint(PrefillPlan.LOCAL_CACHED, None, 300, 256))
    assert (inflight.running, inflight.queued_prefill_tokens) == (1, 44)

    async def chunks():
        yield "a"
        assert inflight.queued_prefill_tokens == 0  # first chunk: prefill done
        yield "b"

    assert [c async for c in tracked.wrap(chunks())] == ["a", "b"]
    assert inflight.running == 0 and changes
    expected["abc"](200)  # the engine reports 200 cached tokens when the request finishes
    assert recorded == [("decode", 256, 200)]
    remote = tracker.begin(Req(), RouteHint(PrefillPlan.REMOTE, "p", 300, 0))
    assert inflight.queued_prefill_tokens == 0  # prefilled elsewhere
    remote.end()
    remote.end()  # idempotent
    assert inflight.running == 0


def test_load_publisher_falls_silent_when_the_replica_cannot_serve():
    """A snapshot of None (the replica's engine died) publishes nothing, so the router's
    staleness check drops the replica; a dict is published with its timestamp."""
    import msgspec
    import zmq

    from app.routing.publisher import LoadPublisher

    state = {"report": None}
    pub = LoadPublisher(lambda: state["report"], "127.0.0.1", bind_host="127.0.0.1")
    sub = zmq.Context.instance().socket(zmq.SUB)
    try:
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(pub.endpoint)
        time.sleep(0.2)  # the subscription reaches the publisher
        pub.publish()
        assert sub.poll(300) == 0
        state["report"] = {"running": 3}
        pub.publish()
        assert sub.poll(2000) != 0
        got = msgspec.msgpack.decode(sub.recv())
        assert got["running"] == 3 and got["ts"] > 0
    finally:
        sub.close(linger=0)
        pub.close()

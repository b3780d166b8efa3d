"""The router's feed over real ZeroMQ sockets: load reports arrive, and a replica whose
process goes away leaves routing at once (its TCP connection drops), long before its
heartbeat would go stale."""

from __future__ import annotations

import threading
import time

import msgspec
import pytest
import zmq

from app.routing.feed import Endpoints, EventFeed
from app.routing.kv_index import KVIndex
from app.routing.load import LoadBook
from tests.integration.serve_harness import wait_until

pytestmark = pytest.mark.integration


def test_reports_then_disconnect_takes_the_replica_out():
    pub = zmq.Context.instance().socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    loads = LoadBook(stale_after_s=60)  # staleness cannot explain what follows
    feed = EventFeed(KVIndex(), loads, threading.Lock())
    try:
        feed.sync({"r": Endpoints(None, None, f"tcp://127.0.0.1:{port}")})
        encode = msgspec.msgpack.Encoder().encode

        def reported() -> bool:
            pub.send(encode({"running": 3}))
            return loads.last_report("r").get("running") == 3

        wait_until(reported, 10, interval=0.05, what="a load report")
        assert loads.alive("r")
        start = time.monotonic()
        pub.close(linger=0)
        wait_until(lambda: not loads.alive("r"), 10, interval=0.01, what="disconnect noticed")
        assert time.monotonic() - start < 2
        assert feed.counters["disconnects"] >= 1
    finally:
        feed.close()

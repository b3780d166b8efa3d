"""The push source watch's decisions (app/handoff/push_source_watch.py): when decode gives up
on pushed KV. Probes are scripted here; the last tests probe real sockets on 127.0.0.1, and
vLLM's own handshake listener."""

from __future__ import annotations

import socket

from app.handoff.push_source_watch import (
    Probe,
    PushSourceWatch,
    probe_engine,
    probe_side_channel,
)

A, B = ("10.0.0.1", 5600, "engine-a"), ("10.0.0.2", 5600, "engine-b")


class Scripted:
    """Answers each source's probes from its script (the last answer repeats)."""

    def __init__(self, **scripts: list[Probe]):
        self.scripts = {A: scripts.get("a", [Probe.ALIVE]), B: scripts.get("b", [Probe.ALIVE])}
        self.calls: list[tuple] = []

    def __call__(self, source):
        self.calls.append(source)
        script = self.scripts[source]
        return script.pop(0) if len(script) > 1 else script[0]


def test_a_live_source_is_never_given_up_and_young_requests_are_not_probed():
    probe = Scripted()
    watch = PushSourceWatch(1.0, probe)
    assert watch.check({"r1": A}, 0.0) == []
    assert probe.calls == []  # awaited for less than one interval: not probed yet
    for t in range(1, 100):
        assert watch.check({"r1": A}, float(t)) == []
    assert len(probe.calls) == 99


def test_two_refusals_in_a_row_give_up_every_request_of_that_source_once():
    probe = Scripted(a=[Probe.REFUSED])
    watch = PushSourceWatch(1.0, probe)
    awaited = {"r1": A, "r2": A, "r3": B}
    assert watch.check(awaited, 0.0) == []
    assert watch.check(awaited, 1.0) == []  # one refusal: a port can be between owners
    assert sorted(watch.check(awaited, 2.0)) == ["r1", "r2"]
    # still listed until the engine thread drains the failures: never reported twice
    assert watch.check(awaited, 3.0) == []
    # a new request from the gone source is given up once it has waited an interval
    assert watch.check({"r3": B, "r4": A}, 4.0) == []
    assert watch.check({"r3": B, "r4": A}, 5.0) == ["r4"]


def test_an_answer_between_refusals_starts_the_count_again():
    probe = Scripted(a=[Probe.REFUSED, Probe.ALIVE, Probe.REFUSED, Probe.REFUSED])
    watch = PushSourceWatch(1.0, probe)
    watch.check({"r1": A}, 0.0)
    assert [watch.check({"r1": A}, float(t)) for t in (1, 2, 3, 4)] == [[], [], [], ["r1"]]


def test_a_silent_source_is_given_up_only_after_unreachable_s():
    probe = Scripted(a=[Probe.SILENT])
    watch = PushSourceWatch(1.0, probe, unreachable_s=10.0)
    watch.check({"r1": A}, 0.0)
    assert all(watch.check({"r1": A}, float(t)) == [] for t in range(1, 11))
    assert watch.check({"r1": A}, 11.0) == ["r1"]


def test_a_source_nothing_is_awaited_from_starts_afresh():
    probe = Scripted(a=[Probe.REFUSED])
    watch = PushSourceWatch(1.0, probe)
    watch.check({"r1": A}, 0.0)
    assert watch.check({"r1": A}, 1.0) == []  # one refusal
    assert watch.check({}, 2.0) == []  # r1 arrived: A's count is dropped
    watch.check({"r2": A}, 3.0)
    assert watch.check({"r2": A}, 4.0) == []  # one refusal again, not the second
    assert watch.check({"r2": A}, 5.0) == ["r2"]


def test_another_engine_at_the_side_channel_gives_its_requests_up_at_once():
    """A prefill engine restarted on the same host and port answers there, so refusals never
    come; the handshake names the new engine, and the old one's requests are given up at the
    first probe. Requests from the new engine, at the same address, are not."""
    replaced = ("10.0.0.1", 5600, "engine-a-before")
    probe = Scripted()
    probe.scripts[replaced] = [Probe.REPLACED]
    watch = PushSourceWatch(1.0, probe)
    awaited = {"old": replaced, "new": A}
    assert watch.check(awaited, 0.0) == []
    assert watch.check(awaited, 1.0) == ["old"]
    assert [watch.check(awaited, float(t)) for t in (2, 3)] == [[], []]


def test_probe_engine_fails_only_on_a_sure_sign():
    asked = []

    def engine_at(address):
        asked.append(address)
        return served

    def connect_to(probe):
        return lambda address: probe

    served = "engine-a"
    assert probe_engine(A, engine_at, connect_to(Probe.ALIVE)) is Probe.ALIVE
    served = "engine-x"  # another engine took the port
    assert probe_engine(A, engine_at, connect_to(Probe.ALIVE)) is Probe.REPLACED
    served = None  # a listener that does not say which engine it is
    assert probe_engine(A, engine_at, connect_to(Probe.ALIVE)) is Probe.ALIVE
    assert asked == [A[:2]] * 3
    for probe in (Probe.REFUSED, Probe.SILENT):  # not asked: nothing accepted the connect
        assert probe_engine(A, engine_at, connect_to(probe)) is probe
    assert len(asked) == 3


def test_probe_tells_a_listener_from_a_closed_port():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert probe_side_channel(("127.0.0.1", port)) is Probe.ALIVE
    assert probe_side_channel(("127.0.0.1", port)) is Probe.REFUSED


def test_the_plugin_fails_the_receive_of_kv_awaited_from_a_closed_port(monkeypatch):
    """The engine-process plugin, applied from the environment, over vLLM's real push worker
    class with a stand-in ``start_load_kv`` (restored after the test): a request awaited from
    a side channel nothing listens on becomes a failed receive in vLLM's queue for them, one
    awaited from a live one does not."""
    from app import engine_process

    _stand_in_push_worker(monkeypatch)
    monkeypatch.setenv(engine_process.PUSH_SOURCE_PROBE_ENV, "0.05")
    engine_process.setup_engine_process()
    with socket.socket() as live, socket.socket() as closed:
        live.bind(("127.0.0.1", 0))
        live.listen()
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        assert _the_one_failed_receive({
            "gone": ("127.0.0.1", closed.getsockname()[1], "p0"),
            "alive": ("127.0.0.1", live.getsockname()[1], "p1")}) == "gone"


def _stand_in_push_worker(monkeypatch) -> None:
    """vLLM's push worker class with ``start_load_kv`` stood in and no watch installed yet."""
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl.push_worker import (
        NixlPushConnectorWorker,
    )

    monkeypatch.setattr(NixlPushConnectorWorker, "start_load_kv", lambda self, metadata: None)
    monkeypatch.setattr(NixlPushConnectorWorker, "_pd_serve_source_probe_s", None,
                        raising=False)


def _the_one_failed_receive(awaited: dict[str, tuple[str, int, str]]) -> str:
    """A push worker awaiting ``awaited`` (request → prefill host, port, engine id) takes an
    engine step; the one receive the installed watch fails, none other in several more
    probes."""
    import queue
    import threading
    import time
    from types import SimpleNamespace

    from vllm.distributed.kv_transfer.kv_connector.v1.nixl.push_worker import (
        NixlPushConnectorWorker,
    )

    worker = NixlPushConnectorWorker.__new__(NixlPushConnectorWorker)
    worker._recving_metadata = {
        req: SimpleNamespace(remote=SimpleNamespace(host=host, port=port, engine_id=engine))
        for req, (host, port, engine) in awaited.items()}
    worker._recving_transfers = {}
    worker._failed_recv_reqs = queue.Queue()
    worker._push_writer_wake = threading.Event()
    worker._push_writer_stop = threading.Event()
    try:
        worker.start_load_kv(SimpleNamespace(reqs_to_recv={}))
        failed = worker._failed_recv_reqs.get(timeout=10)
        assert worker._push_writer_wake.wait(1), "vLLM's writer not woken for the failure"
        time.sleep(0.3)  # several more probes of all
        assert worker._failed_recv_reqs.empty()
        return failed
    finally:
        worker._push_writer_stop.set()
        worker._pd_source_watch_thread.join(timeout=5)


def _vllms_handshake_listener(engine_id: str):
    """vLLM's own NIXL side-channel listener thread (the prefill engine's), serving a
    handshake payload built from vLLM's classes for ``engine_id``, on a free port. Returns
    (port, stop event)."""
    import threading

    import msgspec
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl.base_scheduler import (
        NixlBaseConnectorScheduler,
    )
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl.metadata import (
        NixlAgentMetadata,
        NixlHandshakePayload,
    )

    agent = NixlAgentMetadata(
        engine_id=engine_id, agent_metadata=b"", kv_caches_base_addr=[0], device_id=0,
        num_blocks=1, block_lens=[1], block_strides=[1], kv_cache_layout="NHD",
        block_size=16, ssm_sizes=(0, 0), attn_backend_name="CPU_ATTN",
        physical_blocks_per_logical_kv_block=1)
    payload = NixlHandshakePayload(compatibility_hash="h",
                                   agent_metadata_bytes=msgspec.msgpack.encode(agent))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ready, stop = threading.Event(), threading.Event()
    threading.Thread(target=NixlBaseConnectorScheduler._nixl_handshake_listener,
                     args=({(0, 0): msgspec.msgpack.encode(payload)}, ready, stop,
                           "127.0.0.1", port), daemon=True).start()
    assert ready.wait(10)
    return port, stop


def test_engine_at_reads_the_engine_id_from_vllms_handshake_listener():
    from app.handoff.push_source_watch_patch import engine_at

    port, stop = _vllms_handshake_listener("prefill-engine-7")
    try:
        assert engine_at(("127.0.0.1", port)) == "prefill-engine-7"
    finally:
        stop.set()
    with socket.socket() as quiet:  # accepts, never speaks ZMQ: no answer, not a sure sign
        quiet.bind(("127.0.0.1", 0))
        quiet.listen()
        assert engine_at(quiet.getsockname(), timeout_s=0.2) is None


def test_the_plugin_fails_the_receive_of_kv_awaited_from_a_replaced_engine(monkeypatch):
    """Over vLLM's push worker class and vLLM's own handshake listener: a request awaited
    from engine "before" at the address where engine "after" now listens becomes a failed
    receive at the first probe; one awaited from "after" itself does not."""
    from app.handoff.push_source_watch_patch import patch_push_source_watch

    _stand_in_push_worker(monkeypatch)
    patch_push_source_watch(0.05)
    port, stop = _vllms_handshake_listener("after")
    try:
        assert _the_one_failed_receive({"old": ("127.0.0.1", port, "before"),
                                        "new": ("127.0.0.1", port, "after")}) == "old"
    finally:
        stop.set()

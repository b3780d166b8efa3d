"""Push refusals (app/handoff/push_refusal.py): a registration that reaches prefill after it
let the request's KV go is refused, and decode turns the refusal into a failed receive.

The pure parts directly; the wiring over vLLM's real push worker class with stand-ins for
the NIXL agent and the methods it wraps (restored after each test)."""

from __future__ import annotations

import queue
import threading
from types import SimpleNamespace

import msgspec
import pytest

from app.handoff.push_refusal import REFUSAL_PREFIX, Recent, refusal, refused_request


def test_a_refusal_names_decode_request_and_no_other_notification_reads_as_one():
    assert refused_request(refusal("cmpl-7-0-1a2b3c4d")) == "cmpl-7-0-1a2b3c4d"
    # vLLM's completion notification ("<request id>:<tp>"), a heartbeat, a registration
    for other in (b"cmpl-7-0-1a2b3c4d:1", b"HB:engine", b"PUSH_REG:\x81", REFUSAL_PREFIX):
        assert refused_request(other) is None


def test_recent_remembers_the_last_keys_only_with_their_values():
    book = Recent(size=2)
    for key, value in (("a", 1), ("b", 2), ("a", 3), ("c", 4)):
        book.remember(key, value)
    assert "a" in book and "c" in book and "b" not in book and len(book) == 2
    assert book.pop("a") == 3 and book.pop("a") is None and book.pop("b", "gone") == "gone"
    assert len(book) == 1


class Agent:
    def __init__(self):
        self.sent: list[tuple[str, bytes]] = []

    def send_notif(self, agent, notif_msg):
        self.sent.append((agent, notif_msg))


@pytest.fixture
def worker_cls(monkeypatch):
    """vLLM's push worker class with the wrapped methods stood in, and the plugin applied."""
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl.push_worker import (
        NixlPushConnectorWorker as cls,
    )

    from app import engine_process

    calls = SimpleNamespace(pushes=[], registrations=[], finished_sending=set())

    monkeypatch.setattr(cls, "get_transfer_results", lambda self: SimpleNamespace(
        finished_sending=set(calls.finished_sending), finished_recving=set()))
    monkeypatch.setattr(cls, "_do_start_push_kv", lambda self, rid, blocks, reg:
                        calls.pushes.append((rid, blocks, reg)))
    monkeypatch.setattr(cls, "_handle_push_reg_notif", lambda self, notif:
                        calls.registrations.append(notif))

    calls.done = []  # what vLLM's _pop_done_transfers answers, call by call

    monkeypatch.setattr(cls, "_pop_done_transfers", lambda self, transfers:
                        calls.done.pop(0) if calls.done else (set(), set()))

    def drain(self):  # stands in for vLLM's: reads what the writer forwarded
        out = []
        while not self._pending_completion_notifs.empty():
            out.append(self._pending_completion_notifs.get_nowait())
        calls.read = out
        return set()

    monkeypatch.setattr(cls, "_get_new_notifs", drain)
    for side in ("prefill", "decode"):  # one process each in the app; one class here
        monkeypatch.setattr(cls, f"_pd_serve_refusals_{side}", False, raising=False)
        monkeypatch.setenv(engine_process.PUSH_REFUSALS_ENV, side)
        engine_process.setup_engine_process()
        assert getattr(cls, f"_pd_serve_refusals_{side}")
    calls.workers = []
    yield cls, calls
    for w in calls.workers:  # ends the plugin's threads
        w._push_writer_stop.set()


def _worker(cls, calls, connected=True):
    w = cls.__new__(cls)
    calls.workers.append(w)
    w._push_writer_stop = threading.Event()
    w._deferred_push_inbox = queue.Queue()
    w._push_writer_wake = threading.Event()
    w._push_finished_blocks = {}
    w._pending_d_registrations = {}
    w._pending_completion_notifs = queue.Queue()
    w._failed_recv_reqs = queue.Queue()
    w._recving_metadata = {}
    w._handshake_lock = threading.Lock()
    w._remote_agents = {"decode-engine": {(0, 0): "decode-agent"}} if connected else {}
    w.handshakes = []
    w._ensure_handshake = lambda *a, **k: (w.handshakes.append(a), None)[1] if connected \
        else w.pending
    w.nixl_wrapper = Agent()
    w._sending_transfers = {}
    return w


def _reg(request_id: str) -> dict:
    return {"request_id": request_id, "decode_engine_id": "decode-engine",
            "decode_host": "127.0.0.1", "decode_port": 5601, "decode_tp_size": 1,
            "local_block_ids": [[3, 4]]}


def _writer_runs(w) -> None:
    """What vLLM's writer does with its deferred-push queue (step 2 of its loop)."""
    while not w._deferred_push_inbox.empty():
        w._do_start_push_kv(*w._deferred_push_inbox.get_nowait())


def _notif(reg: dict) -> bytes:
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl.metadata import (
        PUSH_REG_NOTIF_PREFIX,
    )
    return PUSH_REG_NOTIF_PREFIX + msgspec.msgpack.encode(reg)


def test_prefill_refuses_a_registration_that_comes_after_it_let_the_kv_go(worker_cls):
    cls, calls = worker_cls
    w = _worker(cls, calls)
    calls.finished_sending = {"cmpl-1-0-aaaaaaaa"}  # its lease ran out: blocks let go
    w.get_transfer_results()
    assert w._push_writer_wake.is_set()
    _writer_runs(w)
    assert calls.pushes == []  # the mark is the plugin's, not a push for vLLM
    w._handle_push_reg_notif(_notif(_reg("cmpl-1-0-bbbbbbbb")))  # decode's id, other suffix
    assert w.nixl_wrapper.sent == [("decode-agent", refusal("cmpl-1-0-bbbbbbbb"))]
    assert calls.registrations == [] and w._pending_d_registrations == {}
    # a registration for a request not let go is vLLM's to match (it may still finish)
    w._handle_push_reg_notif(_notif(_reg("cmpl-2-0-bbbbbbbb")))
    assert len(calls.registrations) == 1 and len(w.nixl_wrapper.sent) == 1


def test_an_idle_prefill_reads_notifications_after_kv_was_let_go_unclaimed(worker_cls):
    """vLLM's writer reads notifications only when an engine step wakes it; an idle engine
    takes none, so a late registration was not even read. After KV was let go with no
    registration, the plugin wakes the writer on its own."""
    cls, calls = worker_cls
    w = _worker(cls, calls)
    calls.finished_sending = {"cmpl-10-0-aaaaaaaa"}
    w.get_transfer_results()
    _writer_runs(w)
    for _ in range(3):
        w._push_writer_wake.clear()
        assert w._push_writer_wake.wait(timeout=5)


def test_a_kept_registration_is_refused_when_its_request_is_let_go(worker_cls):
    """A registration vLLM already keeps (it matched no finished blocks) is refused, not
    dropped, when the request's blocks are let go."""
    cls, calls = worker_cls
    w = _worker(cls, calls)
    w._pending_d_registrations["cmpl-3-0-bbbbbbbb"] = _reg("cmpl-3-0-bbbbbbbb")
    calls.finished_sending = {"cmpl-3-0-aaaaaaaa"}
    w.get_transfer_results()
    _writer_runs(w)
    assert w._pending_d_registrations == {}
    assert w.nixl_wrapper.sent == [("decode-agent", refusal("cmpl-3-0-bbbbbbbb"))]


def test_blocks_still_waiting_for_a_registration_are_pushed_not_refused(worker_cls):
    cls, calls = worker_cls
    w = _worker(cls, calls)
    calls.finished_sending = {"cmpl-4-0-aaaaaaaa"}
    w.get_transfer_results()
    _writer_runs(w)
    w._push_finished_blocks["cmpl-4-0-cccccccc"] = [[1, 2]]  # the same base id finished again
    w._handle_push_reg_notif(_notif(_reg("cmpl-4-0-bbbbbbbb")))
    assert w.nixl_wrapper.sent == [] and len(calls.registrations) == 1


def test_a_refusal_waits_for_the_connection_to_decode(worker_cls):
    from concurrent.futures import Future

    cls, calls = worker_cls
    w = _worker(cls, calls, connected=False)
    w.pending = Future()
    calls.finished_sending = {"cmpl-5-0-aaaaaaaa"}
    w.get_transfer_results()
    _writer_runs(w)
    w._handle_push_reg_notif(_notif(_reg("cmpl-5-0-bbbbbbbb")))
    assert w.nixl_wrapper.sent == []
    w._remote_agents["decode-engine"] = {(0, 0): "decode-agent"}
    w._ensure_handshake = lambda *a, **k: None
    w.pending.set_result(({}, 0.0))  # the handshake's callback queues the refusal
    _writer_runs(w)
    assert w.nixl_wrapper.sent == [("decode-agent", refusal("cmpl-5-0-bbbbbbbb"))]


def test_decode_turns_a_refusal_into_a_failed_receive_and_passes_the_rest_on(worker_cls):
    cls, calls = worker_cls
    w = _worker(cls, calls)
    w._recving_metadata = {"cmpl-6-0-bbbbbbbb": object()}
    for notif in (b"cmpl-9:1", refusal("cmpl-6-0-bbbbbbbb"), refusal("unknown"), b"HB:x"):
        w._pending_completion_notifs.put(notif)
    w._get_new_notifs()
    assert calls.read == [b"cmpl-9:1", b"HB:x"]
    assert w._failed_recv_reqs.get_nowait() == "cmpl-6-0-bbbbbbbb"
    assert w._failed_recv_reqs.empty()


def test_a_push_whose_write_failed_is_refused_once_all_its_writes_ended(worker_cls):
    """vLLM's prefill tells decode nothing when a WRITE fails. The plugin refuses that
    push's registration, but only once no WRITE of it is in flight any more."""
    cls, calls = worker_cls
    w = _worker(cls, calls)
    w._do_start_push_kv("cmpl-8-0-aaaaaaaa", [[1, 2]], _reg("cmpl-8-0-bbbbbbbb"))  # a push
    w._do_start_push_kv("cmpl-9-0-aaaaaaaa", [[5, 6]], _reg("cmpl-9-0-bbbbbbbb"))  # another
    assert [p[0] for p in calls.pushes] == ["cmpl-8-0-aaaaaaaa", "cmpl-9-0-aaaaaaaa"]
    calls.done = [(set(), {"cmpl-8-0-aaaaaaaa"}),  # one WRITE failed, a sibling in flight
                  ({"cmpl-8-0-aaaaaaaa", "cmpl-9-0-aaaaaaaa"}, set())]  # both ended
    w._pop_done_transfers(w._sending_transfers)
    _writer_runs(w)
    assert w.nixl_wrapper.sent == []
    w._pop_done_transfers(w._sending_transfers)
    _writer_runs(w)
    assert w.nixl_wrapper.sent == [("decode-agent", refusal("cmpl-8-0-bbbbbbbb"))]
    # receives are not pushes: their failures are vLLM's to report
    calls.done = [({"x"}, {"x"})]
    w._pop_done_transfers({"x": [1]})
    _writer_runs(w)
    assert len(w.nixl_wrapper.sent) == 1


def test_each_engine_installs_its_own_side_only(monkeypatch):
    """Prefill refuses, decode reads refusals: a decode engine's notification path is left
    as vLLM's on prefill, and a role without a side is a configuration error."""
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl.push_worker import (
        NixlPushConnectorWorker as cls,
    )

    from app.handoff.push_refusal_patch import patch_push_refusals

    for name in ("get_transfer_results", "_do_start_push_kv", "_handle_push_reg_notif",
                 "_pop_done_transfers", "_get_new_notifs"):
        monkeypatch.setattr(cls, name, getattr(cls, name))  # restored after the test
    for side in ("prefill", "decode"):
        monkeypatch.setattr(cls, f"_pd_serve_refusals_{side}", False, raising=False)
    notifs, finished = cls._get_new_notifs, cls.get_transfer_results
    assert patch_push_refusals("prefill")
    assert cls._get_new_notifs is notifs and cls.get_transfer_results is not finished
    prefill_side = cls.get_transfer_results
    assert patch_push_refusals("decode") and patch_push_refusals("decode")  # idempotent
    assert cls._get_new_notifs is not notifs and cls.get_transfer_results is prefill_side
    with pytest.raises(ValueError, match="aggregated"):
        patch_push_refusals("aggregated")

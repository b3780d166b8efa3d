"""vLLM wiring of push refusals (app/handoff/push_refusal.py), applied by the engine-process
plugin on both engines under push, each with its own side.

Prefill side, all on vLLM's push writer thread (which owns the registrations and NIXL
notifications there): the requests the worker reports done sending (a push ended, a lease
expired) are handed to the writer through vLLM's deferred-push queue, marked ``LET_GO``; the
writer remembers them and refuses a registration already waiting for one of them. A
registration that arrives later for a remembered request is refused instead of kept. After
KV was let go unclaimed, a thread wakes the writer for a while: it reads notifications only
when an engine step wakes it, and an idle prefill engine takes none. A push whose WRITEs
have all ended with one failed (vLLM then frees prefill's blocks at the lease and tells
decode nothing) is handed over marked ``WRITE_FAILED`` and its registration, kept when the
push started, refused. The refusal needs prefill's NIXL connection to decode's agent (the
one its WRITEs use); one not made yet is made first, and the refusal goes from the writer
once it is up.

Decode side: vLLM's writer forwards every notification that is not a registration to the
engine thread; there, before vLLM reads them, refusals are taken out and their requests put
in the worker's queue of failed receives, which vLLM drains in the same call.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from app.handoff.push_notifs import base_request_id, registration, same_request
from app.handoff.push_refusal import Recent, refusal, refused_request

log = logging.getLogger(__name__)

LET_GO = object()  # marks "prefill let go of this request's blocks" in the deferred queue
REFUSE = object()  # ... "refuse this registration" (a connection to decode just came up)
WRITE_FAILED = object()  # ... "this request's push ended with a failed WRITE"
LATE_READ_S = 0.1  # how often an idle prefill reads notifications after unclaimed KV ...
LATE_WATCH_S = 600.0  # ... and for how long (a busy one reads them at every engine step)


def patch_push_refusals(role: str) -> bool:
    """Install ``role``'s side ("prefill" or "decode") on vLLM's push worker; idempotent.
    False where it is absent."""
    try:
        from vllm.distributed.kv_transfer.kv_connector.v1.nixl.push_worker import (
            NixlPushConnectorWorker,
        )
    except Exception:  # noqa: BLE001 - not a vLLM process, or a vLLM without push
        return False
    cls = NixlPushConnectorWorker
    flag = f"_pd_serve_refusals_{role}"
    if getattr(cls, flag, False):
        return True
    if role == "prefill":
        _patch_prefill(cls)
    elif role == "decode":
        _patch_decode(cls)
    else:
        raise ValueError(f"push refusals: no side for role {role!r}")
    setattr(cls, flag, True)
    return True


def _patch_prefill(cls) -> None:
    results, do_start = cls.get_transfer_results, cls._do_start_push_kv
    on_reg, pop_done = cls._handle_push_reg_notif, cls._pop_done_transfers

    def get_transfer_results(self):
        out = results(self)
        if out.finished_sending:
            for req_id in out.finished_sending:
                self._deferred_push_inbox.put((req_id, None, LET_GO))
            self._push_writer_wake.set()
        return out

    def pop_done_transfers(self, transfers):
        done, failed = pop_done(self, transfers)
        if transfers is self.__dict__.get("_sending_transfers"):
            _note_failed_writes(self, done, failed)
        return done, failed

    def do_start_push_kv(self, request_id, local_block_ids, registration_data):
        if registration_data is LET_GO:
            _let_go(self, request_id)
        elif registration_data is REFUSE:
            _refuse(self, *local_block_ids)
        elif registration_data is WRITE_FAILED:
            reg = _book(self, "pushed").pop(request_id)
            if reg is not None:
                _refuse(self, reg, "its WRITE failed")
        else:
            if isinstance(registration_data, dict):  # a push starts: kept for a failure
                _book(self, "pushed").remember(request_id, registration_data)
            return do_start(self, request_id, local_block_ids, registration_data)
        return None

    def handle_push_reg_notif(self, notif):
        reg = registration(notif)
        if reg is not None and _too_late(self, reg["request_id"]):
            _refuse(self, reg)
            return
        on_reg(self, notif)

    cls.get_transfer_results = get_transfer_results
    cls._do_start_push_kv = do_start_push_kv
    cls._handle_push_reg_notif = handle_push_reg_notif
    cls._pop_done_transfers = pop_done_transfers


def _patch_decode(cls) -> None:
    new_notifs = cls._get_new_notifs

    def get_new_notifs(self):
        _take_refusals(self)
        return new_notifs(self)

    cls._get_new_notifs = get_new_notifs


def _book(worker, name: str) -> Recent:
    """Writer thread: one of the worker's bounded books, made on first use:
    ``let_go`` (the base ids of the requests whose blocks this prefill let go) or ``pushed``
    (the registrations of pushes started, by prefill's request id)."""
    key = f"_pd_serve_{name}"
    book = worker.__dict__.get(key)
    if book is None:
        book = Recent()
        setattr(worker, key, book)
    return book


def _too_late(worker, request_id: str) -> bool:
    """The request's blocks were let go and none are waiting for a registration."""
    if base_request_id(request_id) not in _book(worker, "let_go"):
        return False
    return not any(same_request(fin, request_id) for fin in worker._push_finished_blocks)


def _note_failed_writes(worker, done: set, failed: set) -> None:
    """Engine thread, prefill: a push whose WRITEs have all ended, one of them failed, is
    handed to the writer for a refusal (vLLM tells decode nothing, and decode would wait
    for good). Not before every WRITE of it ended: none may still land in decode's blocks."""
    failures = worker.__dict__.setdefault("_pd_serve_failed_writes", set())
    failures.update(failed)
    ended = done & failures
    if ended:
        failures.difference_update(ended)
        for req_id in ended:
            worker._deferred_push_inbox.put((req_id, None, WRITE_FAILED))
        worker._push_writer_wake.set()


def _let_go(worker, request_id: str) -> None:
    """Writer thread: remember the request, refuse a registration already kept for it."""
    _book(worker, "let_go").remember(base_request_id(request_id))
    pushed = _book(worker, "pushed").pop(request_id)
    reg = worker._pop_matching_registration(request_id)
    if reg is not None:
        _refuse(worker, reg)
    elif pushed is None:  # unclaimed: its lease ran out with no registration
        _read_late_registrations(worker)


def _read_late_registrations(worker) -> None:
    """Wake vLLM's writer every ``LATE_READ_S`` for ``LATE_WATCH_S`` after a request's KV was
    let go unclaimed. The writer reads NIXL notifications only when an engine step (or KV
    waiting for a registration) wakes it, and an idle prefill engine has neither: a late
    registration was not even read until the engine's next request."""
    worker._pd_serve_late_until = time.monotonic() + LATE_WATCH_S
    thread = worker.__dict__.get("_pd_serve_late_reader")
    if thread is not None and thread.is_alive():
        return

    def run():
        while (not worker._push_writer_stop.wait(LATE_READ_S)
               and time.monotonic() < worker._pd_serve_late_until):
            worker._push_writer_wake.set()

    thread = worker._pd_serve_late_reader = threading.Thread(
        target=run, name="pd-late-registrations", daemon=True)
    thread.start()


def _refuse(worker, reg: dict, why: str = "it came after this prefill engine let the KV go "
            "(its lease, nixl.kv_lease_s, ran out first)") -> None:
    """Writer thread: tell decode's agent that this registration will get no WRITE."""
    engine_id = reg["decode_engine_id"]
    fut = worker._ensure_handshake(engine_id, reg["decode_host"], reg["decode_port"],
                                   reg["decode_tp_size"])
    if fut is not None:
        def connected(f, registration=reg):
            if f.exception() is None:
                worker._deferred_push_inbox.put((registration["request_id"],
                                                 (registration, why), REFUSE))
                worker._push_writer_wake.set()
            else:
                log.warning("cannot refuse pushed KV for %s: no connection to decode "
                            "engine %s (%s)", registration["request_id"], engine_id,
                            f.exception())
        fut.add_done_callback(connected)
        return
    with worker._handshake_lock:
        agents = list((worker._remote_agents.get(engine_id) or {}).values())
    log.warning("no pushed KV for %s: %s; decode is told to compute the prompt itself",
                reg["request_id"], why)
    for agent in agents:
        try:
            worker.nixl_wrapper.send_notif(agent, notif_msg=refusal(reg["request_id"]))
        except Exception as e:  # noqa: BLE001 - decode's source watch and deadline remain
            log.warning("refusal for %s not sent to %s: %s", reg["request_id"], agent, e)


def _take_refusals(worker) -> None:
    """Engine thread, decode: refused requests become failed receives (vLLM drains those
    right after reading notifications, in the same call)."""
    pending = worker._pending_completion_notifs
    others = []
    while True:
        try:
            notif = pending.get_nowait()
        except queue.Empty:
            break
        req_id = refused_request(notif)
        if req_id is None:
            others.append(notif)
        elif req_id in worker._recving_metadata:
            log.warning("prefill refused the pushed KV for %s (its lease ran out before "
                        "the registration came, or its WRITE failed); decode computes the "
                        "prompt itself", req_id)
            worker._failed_recv_reqs.put(req_id)
    for notif in others:
        pending.put(notif)

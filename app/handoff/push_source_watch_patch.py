"""vLLM wiring of the push source watch (app/handoff/push_source_watch.py), applied by the
engine-process plugin on decode engines under push.

A thread beside vLLM's push worker runs while the worker awaits pushed KV: every interval it
hands the awaited requests and their prefill engines' side channels to
:class:`PushSourceWatch`, and puts the requests it gives up on into the worker's queue of
failed receives, which vLLM's engine thread drains at its next step (as it does for a
registration that could not be sent). A side channel that accepts the connection is asked
which engine it serves, the way vLLM's handshake asks (:func:`engine_at`).
"""

from __future__ import annotations

import logging
import threading
import time

from app.handoff.push_source_watch import Address, PushSourceWatch, Source, probe_engine

HANDSHAKE_TIMEOUT_S = 0.5

log = logging.getLogger(__name__)


def patch_push_source_watch(interval_s: float) -> bool:
    """Install on vLLM's push worker; idempotent (a second call sets the interval). False
    where vLLM's push connector is absent."""
    from app.engine_process import after_push_start_load_kv

    def kick(worker) -> None:
        if worker._recving_metadata:
            _kick(worker, type(worker)._pd_serve_source_probe_s)

    return after_push_start_load_kv("_pd_serve_source_probe_s", interval_s, kick)


def _awaited(worker) -> dict[str, Source]:
    """Requests waiting for a WRITE: registered, with no completion notification yet."""
    out = {}
    for req_id, meta in tuple(worker._recving_metadata.items()):
        remote = meta.remote
        if remote is not None and req_id not in worker._recving_transfers:
            out[req_id] = (remote.host, int(remote.port), str(remote.engine_id))
    return out


def engine_at(address: Address, timeout_s: float = HANDSHAKE_TIMEOUT_S) -> str | None:
    """The engine id the NIXL side channel at ``address`` serves (rank 0's handshake
    payload, asked for as vLLM's own handshake does), or None without a readable answer in
    ``timeout_s``."""
    import msgspec
    import zmq
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl.metadata import GET_META_MSG

    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(f"tcp://{address[0]}:{address[1]}")
        sock.send(msgspec.msgpack.encode((GET_META_MSG, 0, 0)))
        if not sock.poll(int(timeout_s * 1000)):
            return None
        payload = msgspec.msgpack.decode(sock.recv_multipart()[0])
        agent = msgspec.msgpack.decode(payload["agent_metadata_bytes"])
        return str(agent["engine_id"])
    except Exception:  # noqa: BLE001 - an unreadable answer says nothing sure
        return None
    finally:
        sock.close()


def _probe(source: Source):
    return probe_engine(source, engine_at)


def _kick(worker, interval_s: float) -> None:
    """Start the watch thread unless it runs (called every engine step while KV is awaited:
    a thread that has just ended is started again at the next step)."""
    thread = worker.__dict__.get("_pd_source_watch_thread")
    if thread is not None and thread.is_alive():
        return
    watch = worker.__dict__.get("_pd_source_watch")
    if watch is None:
        watch = worker._pd_source_watch = PushSourceWatch(interval_s, _probe)
    watch.interval_s = interval_s
    thread = threading.Thread(target=_run, args=(worker, watch), name="pd-push-source-watch",
                              daemon=True)
    worker._pd_source_watch_thread = thread
    thread.start()


def _run(worker, watch: PushSourceWatch) -> None:
    while not worker._push_writer_stop.wait(watch.interval_s):
        awaited = _awaited(worker)
        if not awaited:
            return
        try:
            gone = watch.check(awaited, time.monotonic())
        except Exception:  # noqa: BLE001 - never take the engine down; vLLM's path stays
            log.exception("push source watch failed; pushed KV is awaited without it")
            return
        for req_id in gone:
            host, port, engine_id = awaited[req_id]
            log.warning("pushed KV for %s will not come: its prefill engine %s (side channel "
                        "%s:%d) is gone; decode frees the blocks (and recomputes the prompt "
                        "if the request is still live)", req_id, engine_id, host, port)
            worker._failed_recv_reqs.put(req_id)
        if gone:
            worker._push_writer_wake.set()

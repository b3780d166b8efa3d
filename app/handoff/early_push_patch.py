"""vLLM wiring of early push (app/handoff/early_push.py), applied by the engine-process plugin.

Scheduler side (``NixlPushConnectorScheduler``, prefill engine core): pushed prefill requests
are watched from their admission; each step's connector metadata carries
``pd_early_push``, {request id: (block ids, tokens ready, prompt length, finishing) or None
when the request ended without a final WRITE}.

Worker side (``NixlPushConnectorWorker``): the engine thread hands those to vLLM's push
writer thread through its own deferred-push queue (so every NIXL WRITE stays on that thread),
marked by :data:`EARLY`; the writer WRITEs newly finished blocks as soon as decode's
registration for the request is there and the handshake to decode is done, and again when a
registration arrives. vLLM's final WRITE then moves the rest; when completing early, the
writer has already moved everything with the notification for a finishing request, and
vLLM's final WRITE only hands those WRITEs' handles to vLLM's own completion tracking.

Supported where the block layouts are the simple ones: CPU KV caches (the engine's forward
pass has ended when the worker reads the step's metadata; on a GPU the previous step's
kernels may still run, so it would need a CUDA event per step), one KV-cache group, no MLA or
mamba state, tensor parallel size 1 on both sides and the same block size. Elsewhere the
request takes vLLM's path unchanged.
"""

from __future__ import annotations

import logging
import time

from app.handoff.early_push import EarlyPushBook, PrefillProgress
from app.handoff.push_notifs import registration, same_request

log = logging.getLogger(__name__)

EARLY = object()  # marks an early-push item in vLLM's deferred-push queue
RETRY = object()  # ... whose handshake to decode has just completed
_FINAL_WAIT_S = 10.0  # the early WRITEs' completion before the final one (they are copies
# done inside ``transfer()`` on a host: already complete in practice)


def patch_push_early_blocks(complete_early: bool = True) -> bool:
    """Install both sides; idempotent (a second call sets ``complete_early``). False where
    vLLM's push connector is absent or the engines are not CPU ones (the scheduler then
    reports no progress either). ``complete_early``: a finishing request's last blocks and
    the "KV written" notification go right after its last forward pass (early_push.py)."""
    try:
        from vllm.distributed.kv_transfer.kv_connector.v1.nixl.push_scheduler import (
            NixlPushConnectorScheduler,
        )
        from vllm.distributed.kv_transfer.kv_connector.v1.nixl.push_worker import (
            NixlPushConnectorWorker,
        )
    except Exception:  # noqa: BLE001 - not a vLLM process, or a vLLM without push
        return False
    if not getattr(NixlPushConnectorWorker, "_pd_serve_early_push", False):
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():  # see the module docstring: CPU KV caches only
            return False
        _patch_scheduler(NixlPushConnectorScheduler)
        _patch_worker(NixlPushConnectorWorker)
        NixlPushConnectorWorker._pd_serve_early_push = True
    NixlPushConnectorWorker._pd_serve_complete_early = complete_early
    NixlPushConnectorScheduler._pd_serve_complete_early = complete_early
    return True


# --- scheduler (engine core) -------------------------------------------------------------

def _progress(sched) -> PrefillProgress:
    tracker = sched.__dict__.get("_pd_early_progress")
    if tracker is None:
        tracker = sched._pd_early_progress = PrefillProgress(sched.block_size)
        sched._pd_early_ended = {}
    return tracker


def _patch_scheduler(cls) -> None:
    after_alloc, finished, build = (cls.update_state_after_alloc, cls.request_finished,
                                    cls.build_connector_meta)

    def update_state_after_alloc(self, request, blocks, num_external_tokens):
        after_alloc(self, request, blocks, num_external_tokens)
        params = request.kv_transfer_params or {}
        if params.get("do_remote_decode") and request.request_id not in _progress(self):
            single = self._pd_serve_complete_early and request.max_tokens == 1
            _progress(self).watch(request.request_id, len(request.prompt_token_ids or ()),
                                  single_token=single)

    def request_finished(self, request, block_ids):
        from vllm.v1.request import RequestStatus

        tracker = _progress(self)
        status = request.status
        if tracker.finishing(request.request_id) and status not in (
                RequestStatus.FINISHED_LENGTH_CAPPED, RequestStatus.FINISHED_STOPPED):
            # Reported as finishing, so its worker may have WRITTEN every block already and
            # be reading them still: an abort must not free them at once. Finished as vLLM
            # finishes a pushed request instead, its blocks wait for those WRITEs.
            request.status = RequestStatus.FINISHED_LENGTH_CAPPED
        try:
            delay_free, params = finished(self, request, block_ids)
        finally:
            request.status = status
        if request.request_id in tracker:
            tracker.forget(request.request_id)
            if not delay_free:  # no final WRITE will come for it: the worker drops its record
                self._pd_early_ended[request.request_id] = None
        return delay_free, params

    def build_connector_meta(self, scheduler_output):
        meta = build(self, scheduler_output)
        tracker = _progress(self)
        # vLLM's worker calls start_load_kv after the step's forward pass unless the step
        # has synchronous loads (a prefill engine never does): the KV of the tokens this
        # step computes is then in memory too.
        after = not scheduler_output.has_sync_kv_loads
        scheduled = scheduler_output.num_scheduled_tokens

        def ready(req_id: str, computed: int) -> int:
            return computed + (scheduled.get(req_id, 0) if after else 0)

        for new in scheduler_output.scheduled_new_reqs:
            if new.req_id in tracker:
                groups = new.block_ids
                if len(groups) == 1:
                    tracker.scheduled(new.req_id, groups[0],
                                      ready(new.req_id, new.num_computed_tokens), True)
                else:
                    tracker.forget(new.req_id)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            if req_id not in tracker:
                continue
            if req_id in cached.resumed_req_ids:  # preempted: its blocks moved
                tracker.forget(req_id)
                continue
            groups = cached.new_block_ids[i]
            tracker.scheduled(req_id, groups[0] if groups else None,
                              ready(req_id, cached.num_computed_tokens[i]), False)
        updates = {**tracker.take(), **self._pd_early_ended}
        self._pd_early_ended = {}
        if updates:
            meta.pd_early_push = updates
        return meta

    cls.update_state_after_alloc = update_state_after_alloc
    cls.request_finished = request_finished
    cls.build_connector_meta = build_connector_meta


# --- worker ------------------------------------------------------------------------------

def _book(worker) -> EarlyPushBook:
    book = worker.__dict__.get("_pd_early_book")
    if book is None:
        book = worker._pd_early_book = EarlyPushBook(worker.block_size)
    return book


def _supported(worker) -> bool:
    return (worker.device_type == "cpu" and not worker.use_host_buffer
            and not worker.use_mla and not worker._has_mamba and worker.world_size == 1
            and worker._physical_blocks_per_logical_kv_block == 1
            and not worker._transfer_layer_group_ids)


def _registration(worker, req_id: str):
    """Decode's registration for prefill request ``req_id``, left in place for vLLM's match."""
    regs = worker._pending_d_registrations
    if req_id in regs:
        return regs[req_id]
    for reg_id, reg in list(regs.items()):
        if same_request(reg_id, req_id):
            return reg
    return None


def _one_group(block_ids) -> list[int] | None:
    if block_ids and isinstance(block_ids[0], (list, tuple)):
        return list(block_ids[0]) if len(block_ids) == 1 else None
    return list(block_ids or [])


def _retry_when_connected(worker, req_id: str, fut) -> None:
    def done(f, rid=req_id):
        if f.exception() is None:
            worker._deferred_push_inbox.put((rid, RETRY, EARLY))
            worker._push_writer_wake.set()
    fut.add_done_callback(done)


def _send_ready(worker, req_id: str) -> None:
    """Post a WRITE of the request's newly finished blocks, if decode is ready for them."""
    rec = _book(worker).get(req_id)
    if rec is None or rec.disabled:
        return
    reg = _registration(worker, req_id)
    if reg is None:
        return
    d_blocks = _one_group(reg.get("local_block_ids"))
    if (d_blocks is None or int(reg.get("decode_tp_size", 1)) != 1
            or not _supported(worker)):
        rec.disabled = True
        return
    dst = reg["decode_engine_id"]
    fut = worker._ensure_handshake(dst, reg["decode_host"], reg["decode_port"],
                                   reg["decode_tp_size"])
    if fut is not None:
        _retry_when_connected(worker, req_id, fut)
        return
    info = worker.transfer_topo.get_engine_info(dst)
    if (worker.transfer_topo.block_size_ratio(info.remote_block_size) != 1
            or info.remote_physical_blocks_per_logical != 1
            or worker.region_group_ids != worker.dst_region_group_ids[dst]):
        rec.disabled = True
        return
    span = rec.next_span(len(d_blocks), complete=type(worker)._pd_serve_complete_early)
    if span is None:
        return
    p_ids, d_index, sent, completes = span
    if completes and not _all_done(worker, rec.handles):
        rec.disabled = True  # an early WRITE failed: the final WRITE moves every block
        return
    # vLLM's "KV written" notification (its push _xfer_blocks'): decode's request id, TP size
    notif = f"{reg['request_id']}:{worker.world_size}".encode() if completes else None
    handle = _post_write(worker, dst, info, p_ids, [d_blocks[i] for i in d_index], notif)
    if handle is None:
        rec.disabled = True  # the final WRITE moves every block
        return
    rec.commit(sent, handle, completes)
    worker._engine_last_active[dst] = time.perf_counter()


def _post_write(worker, dst: str, info, p_ids: list[int], d_ids: list[int],
                notif: bytes | None = None):
    """A WRITE of prefill blocks ``p_ids`` into decode blocks ``d_ids``; with no notification
    unless it completes the request (decode must learn of its KV only once all of it is
    there). Mirrors vLLM's push _xfer_blocks for the simple layout :func:`_supported`
    admits."""
    remote = worker._compute_desc_ids(
        block_ids=[d_ids], dst_num_blocks=worker.dst_num_blocks[dst], block_size_ratio=None,
        physical_blocks_per_logical=info.remote_physical_blocks_per_logical,
        region_num_blocks=worker.dst_region_num_blocks[dst],
        region_group_ids=worker.dst_region_group_ids[dst],
        uses_region_group_mapping=worker.dst_uses_region_group_mapping[dst])
    local = worker._compute_desc_ids(
        block_ids=[p_ids], dst_num_blocks=worker.dst_num_blocks[worker.engine_id],
        block_size_ratio=1, physical_blocks_per_logical=1,
        region_num_blocks=worker.dst_region_num_blocks[worker.engine_id],
        region_group_ids=worker.region_group_ids,
        uses_region_group_mapping=worker._uses_region_group_mapping)
    handle = None
    try:
        handle = worker.nixl_wrapper.make_prepped_xfer(
            "WRITE", worker.src_xfer_handles_by_block_size[info.remote_block_size], local,
            worker.dst_xfer_side_handles[dst][0], remote,
            **({"notif_msg": notif} if notif is not None else {}))
        worker.nixl_wrapper.transfer(handle)
        return handle
    except Exception as e:  # noqa: BLE001 - the final WRITE moves every block instead
        log.warning("early push WRITE to %s failed (%s); the final WRITE moves every block",
                    dst, e)
        if handle is not None:
            _release(worker, handle)
        return None


def _release(worker, handle) -> None:
    try:
        worker.nixl_wrapper.release_xfer_handle(handle)
    except Exception:  # noqa: BLE001
        log.debug("releasing an early push handle failed", exc_info=True)


def _state_when_settled(worker, handle, deadline: float) -> str:
    """The handle's transfer state once it left PROC, or PROC at ``deadline``."""
    while True:
        try:
            state = worker.nixl_wrapper.check_xfer_state(handle)
        except Exception:  # noqa: BLE001
            return "ERR"
        if state != "PROC" or time.monotonic() >= deadline:
            return state
        time.sleep(0.0002)


def _all_done(worker, handles) -> bool:
    """Whether every one of ``handles`` completes (waits up to the final-WRITE bound). The
    notification goes only after every earlier WRITE has landed: decode runs the request as
    soon as it arrives."""
    deadline = time.monotonic() + _FINAL_WAIT_S
    return all(_state_when_settled(worker, h, deadline) == "DONE" for h in handles)


def _settle(worker, rec) -> bool:
    """Wait for the record's early WRITEs; True if all completed. Releases the handles."""
    ok, deadline = True, time.monotonic() + _FINAL_WAIT_S
    for handle in rec.handles:
        if _state_when_settled(worker, handle, deadline) == "DONE":
            worker.xfer_stats.record_transfer(worker.nixl_wrapper.get_xfer_telemetry(handle))
        else:
            ok = False
        _release(worker, handle)
    rec.handles = []
    return ok


def _patch_worker(cls) -> None:
    start_load_kv, do_start, on_reg = (cls.start_load_kv, cls._do_start_push_kv,
                                       cls._handle_push_reg_notif)

    def start_load_kv_early(self, metadata):
        start_load_kv(self, metadata)
        updates = getattr(metadata, "pd_early_push", None)
        if updates:
            for req_id, progress in updates.items():
                self._deferred_push_inbox.put((req_id, progress, EARLY))
            self._push_writer_wake.set()

    def do_start_push_kv(self, request_id, local_block_ids, registration_data):
        book = _book(self)
        if registration_data is EARLY:  # on the writer thread: progress, a retry, an end
            if local_block_ids is None:  # the request ended with no final WRITE
                rec = book.pop(request_id)
                if rec is not None:
                    _settle(self, rec)
                return
            if local_block_ids is not RETRY:
                book.progress(request_id, local_block_ids)
            _send_ready(self, request_id)
            return
        rec = book.pop(request_id)
        if rec is None or not rec.handles:
            return do_start(self, request_id, local_block_ids, registration_data)
        if rec.completed:  # every block and the notification went: only free after them
            with self._sending_transfers_lock:
                self._sending_transfers[request_id].extend(rec.handles)
            self._engine_last_active[registration_data["decode_engine_id"]] = \
                time.perf_counter()
            return None
        settled = _settle(self, rec)
        final_p = _one_group(local_block_ids)
        d_blocks = _one_group(registration_data.get("local_block_ids"))
        rest = (rec.remainder(final_p, len(d_blocks))
                if settled and final_p is not None and d_blocks is not None else None)
        if rest is None:
            return do_start(self, request_id, local_block_ids, registration_data)
        p_rest, d_start = rest
        log.debug("early push %s: %d of %d blocks written before the finish", request_id,
                  rec.sent - rec.offset, len(d_blocks))
        return do_start(self, request_id, (p_rest,),
                        {**registration_data, "local_block_ids": (d_blocks[d_start:],)})

    def handle_push_reg_notif(self, notif):
        on_reg(self, notif)
        book = self.__dict__.get("_pd_early_book")
        if not book or not book.ids():
            return
        reg = registration(notif)
        if reg is None:
            return
        for req_id in book.ids():
            if same_request(req_id, reg["request_id"]):
                _send_ready(self, req_id)

    cls.start_load_kv = start_load_kv_early
    cls._do_start_push_kv = do_start_push_kv
    cls._handle_push_reg_notif = handle_push_reg_notif

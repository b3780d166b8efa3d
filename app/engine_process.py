"""Per-process fixes every vLLM engine process needs on these machines.

Registered as a vLLM general plugin (entry point ``vllm.general_plugins``), so vLLM itself runs
it in the API process, the engine-core process and every worker, including spawned ones that
never import our code otherwise. The fixes are measured in DESIGN.md and docs/HANDOFF.md:

* AMX: vLLM-CPU's bf16 kernels use AMX tiles without asking Linux for permission; the first
  single-token forward pass of a fresh engine then dies with SIGILL. Asking is harmless where
  AMX is absent.
* NIXL busy polling: ``nixl_agent`` hard-codes its progress thread's delay to 0 µs, so every idle
  engine spins a whole core. ``PD_NIXL_PROGRESS_DELAY_US`` (set by the engine deployment from
  config) makes it sleep between polls.
* vLLM's shared-memory queue readers spin for 1 s after every message (``PD_SHM_BUSY_LOOP_S``
  shortens that, see :func:`patch_shm_busy_loop`).
* vLLM's engine core sleeps 1 ms between engine steps that ran no model while requests wait
  (for remote KV): on a pull decode engine that is on every handoff's path, once or twice
  (``PD_KV_WAIT_SLEEP_S`` shortens it, see :func:`patch_kv_wait_sleep`).
* A decode engine sleeps that same idle-step sleep right after the step that learnt a
  request's KV arrived, before the step that runs it: ``PD_KV_READY_AT_ONCE=1`` skips it
  (:func:`patch_kv_ready_at_once`).
* On a pull decode engine, vLLM posts a step's KV READs after its forward pass, which on a CPU
  is after the whole forward: ``PD_KV_READS_BEFORE_FORWARD=1`` posts them before it, so they
  finish during it (:func:`patch_reads_before_forward`).
* On a push decode engine, vLLM's push writer thread reads NIXL notifications (the "KV
  written" one included) only when an engine step wakes it, and the step after that one
  takes the request: ``PD_PUSH_NOTIF_POLL_S`` wakes it on its own while pushed KV is
  awaited, so the next step takes it (:func:`patch_push_notif_poll`).
* On a push prefill engine, vLLM WRITEs a prompt's KV only when the request has finished:
  ``PD_PUSH_EARLY_BLOCKS=1`` WRITEs each chunk's finished blocks while later chunks compute,
  and ``PD_PUSH_COMPLETE_EARLY=1`` the last ones with the notification right after the last
  forward pass (app/handoff/early_push_patch.py).
* On a push decode engine, vLLM waits for a WRITE without limit, even once its prefill
  engine is gone: ``PD_PUSH_SOURCE_PROBE_S`` probes that engine's side channel and fails the
  receive of a gone one, so decode frees the blocks (app/handoff/push_source_watch.py).
* vLLM's KV-event publisher *binds* only wildcard endpoints (``tcp://*:port``, every
  interface) and *connects* to any other. ``PD_KV_EVENTS_BIND_HOST=1`` makes it bind a
  host-specific endpoint too, so the socket listens on the cluster-internal address only
  (:func:`patch_kv_events_bind`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
import time
import types
from collections.abc import Mapping

log = logging.getLogger(__name__)

NIXL_DELAY_ENV = "PD_NIXL_PROGRESS_DELAY_US"
SHM_BUSY_LOOP_ENV = "PD_SHM_BUSY_LOOP_S"
# The spin window of the local configs, the tests and the benches (2-core hosts where engines
# are pinned to every core). 0.0005 s: shorter than the decode engine's 1 ms idle step while
# it waits for KV, so its worker stops spinning between steps; measured against 0.002 in
# docs/BENCHMARKS.md (issue 11).
SMALL_HOST_SHM_BUSY_LOOP_S = 0.0005
KV_EVENTS_BIND_ENV = "PD_KV_EVENTS_BIND_HOST"
KV_WAIT_SLEEP_ENV = "PD_KV_WAIT_SLEEP_S"
# vLLM's EngineCore._process_engine_step: ``time.sleep(0.001)`` after a step that ran no model
# while the scheduler still has requests (waiting for remote KV, or delayed frees).
VLLM_KV_WAIT_SLEEP_S = 0.001
KV_READS_FIRST_ENV = "PD_KV_READS_BEFORE_FORWARD"
PUSH_NOTIF_POLL_ENV = "PD_PUSH_NOTIF_POLL_S"
PUSH_EARLY_BLOCKS_ENV = "PD_PUSH_EARLY_BLOCKS"
PUSH_SOURCE_PROBE_ENV = "PD_PUSH_SOURCE_PROBE_S"
PUSH_COMPLETE_EARLY_ENV = "PD_PUSH_COMPLETE_EARLY"
PUSH_REFUSALS_ENV = "PD_PUSH_REFUSALS"
KV_READY_AT_ONCE_ENV = "PD_KV_READY_AT_ONCE"
_SYS_ARCH_PRCTL = 158
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18


def request_amx_permission() -> bool:
    """Ask the kernel for AMX tile state; False where unsupported (non-x86, old kernel)."""
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False


def patch_nixl_progress_delay(delay_us: int) -> bool:
    """Make NIXL agents created from now on sleep ``delay_us`` between progress polls."""
    # vLLM sets this only if NIXL is not imported yet; we import it first, so set it here.
    os.environ.setdefault("UCX_RCACHE_MAX_UNRELEASED", "1024")
    try:
        import nixl._api as api  # resolves to nixl_cu12/_cu13 at run time
    except Exception:  # noqa: BLE001 - NIXL absent or its GPU plugins unloadable
        return False
    bind = getattr(api, "nixlBind", None)
    if bind is None or getattr(bind, "_pd_serve_patched", False):
        return bind is not None
    original_agent = bind.nixlAgent

    def agent_with_delay(name, config):
        config.pthrDelay = delay_us
        return original_agent(name, config)

    proxy = types.SimpleNamespace(
        **{k: getattr(bind, k) for k in dir(bind) if not k.startswith("__")}
    )
    proxy.nixlAgent = agent_with_delay
    proxy._pd_serve_patched = True
    api.nixlBind = proxy
    return True


# Notifications are one byte and readers conflate them: no reason to ever drop one.
_SHM_NOTIFY_SNDHWM = 1000
# A missed wake-up costs at most this instead of vLLM's 5 s re-check; idle readers wake 20x/s.
_SHM_RECHECK_MS = 50


def patch_shm_busy_loop(seconds: float) -> bool:
    """Make vLLM's shared-memory queue readers created from now on spin at most ``seconds``.

    A short window alone is not safe: a reader that has gone idle waits on a ZeroMQ wake-up
    that the writer publishes with ``SNDHWM=1``, so a wake-up sent while the previous one is
    still unacknowledged is silently dropped, and the reader sleeps until vLLM's 5 s
    re-check. With a 1 s window readers seldom go idle mid-request and it rarely shows; with
    2 ms it stalled 12 of 80 aggregated requests by exactly ~5 s (measured). So the writer's
    notify socket is re-bound with a high-water mark that never drops (readers connect
    later, to the same ipc path), and the re-check is shortened as a bound on anything else.
    """
    try:
        import zmq
        from vllm.distributed.device_communicators import shm_broadcast
    except Exception:  # noqa: BLE001 - not a vLLM process
        return False
    cls = shm_broadcast.SpinCondition
    if getattr(cls, "_pd_serve_busy_loop_s", None) is not None:
        return True
    original_init = cls.__init__

    def init(self, is_reader, context, notify_address, busy_loop_s: float = 1):
        original_init(self, is_reader, context, notify_address, busy_loop_s=seconds)
        if not is_reader:
            sock = self.local_notify_socket
            sock.unbind(notify_address)
            sock.setsockopt(zmq.SNDHWM, _SHM_NOTIFY_SNDHWM)
            sock.bind(notify_address)

    cls.__init__ = init
    cls._pd_serve_busy_loop_s = seconds
    shm_broadcast.SHM_READER_RECHECK_INTERVAL_MS = min(
        shm_broadcast.SHM_READER_RECHECK_INTERVAL_MS, _SHM_RECHECK_MS)
    return True


class _KvWaitClock:
    """vLLM's engine-core module sees this as its ``time``: everything is the real module's
    except the idle-step sleep, which becomes ``seconds``, or nothing at all right after a
    step in which a request's KV arrived when ``skip_when_ready`` (see
    :func:`patch_kv_ready_at_once`)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.skip_when_ready = False

    def __getattr__(self, name: str):
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        if seconds != VLLM_KV_WAIT_SLEEP_S:
            time.sleep(seconds)
        elif not (self.skip_when_ready and _KV_READY[0]):
            time.sleep(self.seconds)


# Set by the engine core's post-step hook: the step just ended has made a request's KV
# ready (it runs at the next step), so the idle-step sleep would only delay it. Once per
# set of such requests: a ready request the scheduler cannot run yet never makes it spin.
_KV_READY: list = [False, frozenset()]


def _kv_wait_clock():
    from vllm.v1.engine import core

    if not isinstance(core.time, _KvWaitClock):
        core.time = _KvWaitClock(VLLM_KV_WAIT_SLEEP_S)
    return core.time


def patch_kv_wait_sleep(seconds: float) -> bool:
    """Make the engine core sleep ``seconds`` instead of 1 ms between steps that ran no model.

    A pull decode engine posts its READ in one such step and notices it done in a later one,
    then schedules the request in the next: with vLLM's 1 ms in between, the finished READ
    waits up to a millisecond (each time it is polled) before decode runs the request.
    """
    try:
        _kv_wait_clock().seconds = seconds
    except Exception:  # noqa: BLE001 - not a vLLM process
        return False
    return True


def patch_kv_ready_at_once() -> bool:
    """Skip the engine core's idle-step sleep after a step in which a request's KV arrived.

    The step that learns a READ finished (pull) or a pushed KV landed (push) runs no model,
    so vLLM sleeps (1 ms, or ``kv_wait_sleep_s``; 0.4-1.1 ms taken on shared cores) before
    the step that runs the request: on every disaggregated request's path, for nothing.
    """
    try:
        from vllm.v1.engine import core

        clock = _kv_wait_clock()
    except Exception:  # noqa: BLE001 - not a vLLM process
        return False
    clock.skip_when_ready = True
    cls = core.EngineCore
    if getattr(cls, "_pd_serve_ready_at_once", False):
        return True
    post_step = cls.post_step

    def post_step_marking_ready(self, model_executed):
        post_step(self, model_executed)
        ready = frozenset(getattr(self.scheduler, "finished_recving_kv_req_ids", None) or ())
        _KV_READY[0] = bool(ready) and ready != _KV_READY[1]
        _KV_READY[1] = ready

    cls.post_step = post_step_marking_ready
    cls._pd_serve_ready_at_once = True
    return True


def patch_reads_before_forward() -> bool:
    """Make a step that starts KV READs post them before its forward pass, not after.

    vLLM posts a step's READs after launching its forward pass (keeping their host-side cost
    off a GPU's critical path) and collects what finished right after. On a CPU the forward
    runs to its end before the READs are even posted, so they are collected one step later
    and the request runs the step after that: two decode steps in its token 1 -> 2 gap. The
    scheduler marks such steps as having synchronous loads, which is what makes vLLM's worker
    post them first; the forward pass then overlaps them.
    """
    try:
        from vllm.v1.core.sched.scheduler import Scheduler
    except Exception:  # noqa: BLE001 - not a vLLM process
        return False
    if getattr(Scheduler, "_pd_serve_reads_first", False):
        return True
    schedule = Scheduler.schedule

    def schedule_reads_first(self, *args, **kwargs):
        out = schedule(self, *args, **kwargs)
        if getattr(out.kv_connector_metadata, "reqs_to_recv", None):
            out.has_sync_kv_loads = True
        return out

    Scheduler.schedule = schedule_reads_first
    Scheduler._pd_serve_reads_first = True
    return True


class PushNotifPoller:
    """Wakes a waiting thread every ``interval_s`` while ``awaited()`` names requests.

    vLLM's push writer thread parks until an engine step wakes it; the "KV written"
    notification it then drains is taken by the scheduler only at the step after. Waking it
    meanwhile moves that to the next step: one step less on every pushed request's path (an
    idle loop's 1-2 ms on a CPU, a whole decode step under load). ``kick()`` starts the
    thread when needed; it ends by itself once nothing is awaited, at ``stopped()``, or after
    ``give_up_s`` of waiting (a WRITE that never comes: its prefill engine died), and then
    starts again only for a request it has not given up on. ``kick()`` runs on one thread
    (the engine's, every step): a live poller costs it one check.
    """

    def __init__(self, interval_s: float, awaited, wake, stopped=lambda: False,
                 give_up_s: float = 120.0):
        self.interval_s, self.give_up_s = interval_s, give_up_s
        self.awaited, self.wake, self.stopped = awaited, wake, stopped
        self._given_up: frozenset = frozenset()
        self._thread: threading.Thread | None = None

    def kick(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        keys = set(self.awaited())
        if keys and not keys <= self._given_up:
            self._thread = threading.Thread(target=self._run, name="pd-push-notif-poll",
                                            daemon=True)
            self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + self.give_up_s
        while not self.stopped():
            keys = self.awaited()
            if not keys:
                return
            if time.monotonic() > deadline:
                self._given_up = frozenset(keys)
                return
            time.sleep(self.interval_s)
            self.wake()


def drop_abort_cleanups(recving: dict, reqs_to_recv: Mapping) -> None:
    """Forget the receives just added that await nothing.

    A decode request aborted before it was scheduled still gets a receive entry with no
    blocks (vLLM's "aborted cleanup", meant to tell prefill to free its KV). vLLM's pull
    worker never records such an entry; its push worker keeps it in ``_recving_metadata``
    for good, where nothing completes it. Every hook that reads the awaited receives would
    then wait on it (the notification poller spun for its 120 s give-up), and when its
    prefill engine died the source watch failed it as a receive, whose empty block list
    crashed the decode engine (IndexError in vLLM's ``get_transfer_results``; found by
    tests/integration/test_push_transfer.py in CI). Same test as the pull worker's."""
    for req_id, meta in reqs_to_recv.items():
        if not (meta.awaiting_kvs or any(meta.local_block_ids)):
            recving.pop(req_id, None)


def after_push_start_load_kv(setting: str, value, after) -> bool:
    """Run ``after(worker)`` after every ``start_load_kv`` of vLLM's push worker (each
    engine step), the class attribute ``setting`` holding ``value``; a second call only
    updates the value. One wrapper serves every hook, so the receives that await nothing
    are dropped once a step, before any hook reads them. False where vLLM's push connector
    is absent."""
    try:
        from vllm.distributed.kv_transfer.kv_connector.v1.nixl.push_worker import (
            NixlPushConnectorWorker,
        )
    except Exception:  # noqa: BLE001 - not a vLLM process, or a vLLM without push
        return False
    cls = NixlPushConnectorWorker
    hooks = getattr(cls.start_load_kv, "_pd_serve_hooks", None)
    if hooks is None:
        start_load_kv, hooks = cls.start_load_kv, {}

        def start_load_kv_then(self, metadata):
            start_load_kv(self, metadata)
            drop_abort_cleanups(self._recving_metadata, metadata.reqs_to_recv)
            for hook in hooks.values():
                hook(self)

        start_load_kv_then._pd_serve_hooks = hooks
        cls.start_load_kv = start_load_kv_then
    hooks.setdefault(setting, after)
    setattr(cls, setting, value)
    return True


def patch_push_notif_poll(interval_s: float) -> bool:
    """Make a push decode engine's writer thread drain NIXL notifications every
    ``interval_s`` while the engine awaits pushed KV (see :class:`PushNotifPoller`)."""
    def kick(worker) -> None:
        poller = worker.__dict__.get("_pd_serve_notif_poller")
        if poller is None:
            poller = worker._pd_serve_notif_poller = PushNotifPoller(
                # a snapshot of the keys (tuple() of a dict runs without releasing the GIL)
                interval_s, lambda: tuple(worker._recving_metadata),
                worker._push_writer_wake.set, worker._push_writer_stop.is_set)
        poller.interval_s = type(worker)._pd_serve_notif_poll_s
        poller.kick()

    return after_push_start_load_kv("_pd_serve_notif_poll_s", interval_s, kick)


def patch_kv_events_bind() -> bool:
    """Make vLLM's ZMQ KV-event publisher bind ``tcp://<host>:<port>`` instead of connecting.

    The router subscribes (connects) to the publisher, so the publisher must listen; binding
    the advertised address instead of ``*`` keeps the socket off public interfaces.
    """
    try:
        from vllm.distributed.kv_events import ZmqEventPublisher
    except Exception:  # noqa: BLE001 - not a vLLM process
        return False
    if getattr(ZmqEventPublisher, "_pd_serve_bind_host", False):
        return True
    ZmqEventPublisher._is_bind_endpoint = staticmethod(
        lambda endpoint: endpoint.startswith(("tcp://", "ipc://", "inproc://")))
    ZmqEventPublisher._pd_serve_bind_host = True
    return True


def setup_engine_process() -> None:
    """vLLM general-plugin hook: idempotent, cheap, safe in any process."""
    request_amx_permission()
    delay = os.environ.get(NIXL_DELAY_ENV)
    if delay:
        patch_nixl_progress_delay(int(delay))
    busy = os.environ.get(SHM_BUSY_LOOP_ENV)
    if busy:
        patch_shm_busy_loop(float(busy))
    if os.environ.get(KV_EVENTS_BIND_ENV) == "1":
        patch_kv_events_bind()
    kv_wait = os.environ.get(KV_WAIT_SLEEP_ENV)
    if kv_wait:
        patch_kv_wait_sleep(float(kv_wait))
    if os.environ.get(KV_READS_FIRST_ENV) == "1":
        patch_reads_before_forward()
    if os.environ.get(KV_READY_AT_ONCE_ENV) == "1":
        patch_kv_ready_at_once()
    notif_poll = os.environ.get(PUSH_NOTIF_POLL_ENV)
    if notif_poll:
        patch_push_notif_poll(float(notif_poll))
    if os.environ.get(PUSH_EARLY_BLOCKS_ENV) == "1":
        from app.handoff.early_push_patch import patch_push_early_blocks

        patch_push_early_blocks(os.environ.get(PUSH_COMPLETE_EARLY_ENV) == "1")
    source_probe = os.environ.get(PUSH_SOURCE_PROBE_ENV)
    if source_probe:
        from app.handoff.push_source_watch_patch import patch_push_source_watch

        patch_push_source_watch(float(source_probe))
    refusal_side = os.environ.get(PUSH_REFUSALS_ENV)
    if refusal_side in ("prefill", "decode"):  # after early push: it sees its marks first
        from app.handoff.push_refusal_patch import patch_push_refusals

        patch_push_refusals(refusal_side)

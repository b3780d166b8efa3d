"""The NIXL progress-delay patch, against a stand-in for NIXL's compiled bindings."""

import sys
import time
import types

import zmq

from app import engine_process


class _Config:
    pthrDelay = 0


def _fake_nixl(monkeypatch):
    created = []

    def nixl_agent(name, config):
        created.append((name, config.pthrDelay))
        return object()

    bind = types.SimpleNamespace(nixlAgent=nixl_agent, nixlAgentConfig=_Config, other=42)
    api = types.ModuleType("nixl._api")
    api.nixlBind = bind
    pkg = types.ModuleType("nixl")
    pkg._api = api
    monkeypatch.setitem(sys.modules, "nixl", pkg)
    monkeypatch.setitem(sys.modules, "nixl._api", api)
    return api, created


def test_patch_sets_delay_on_every_new_agent(monkeypatch):
    api, created = _fake_nixl(monkeypatch)
    assert engine_process.patch_nixl_progress_delay(100)
    api.nixlBind.nixlAgent("a", _Config())
    assert created == [("a", 100)]
    assert api.nixlBind.other == 42  # the rest of the bindings pass through


def test_patch_is_idempotent(monkeypatch):
    api, created = _fake_nixl(monkeypatch)
    engine_process.patch_nixl_progress_delay(100)
    engine_process.patch_nixl_progress_delay(5)
    api.nixlBind.nixlAgent("a", _Config())
    assert created == [("a", 100)]


def test_plugin_applies_delay_from_environment(monkeypatch):
    api, created = _fake_nixl(monkeypatch)
    monkeypatch.setenv(engine_process.NIXL_DELAY_ENV, "250")
    engine_process.setup_engine_process()
    api.nixlBind.nixlAgent("b", _Config())
    assert created == [("b", 250)]


def test_plugin_leaves_nixl_alone_without_setting(monkeypatch):
    api, created = _fake_nixl(monkeypatch)
    monkeypatch.delenv(engine_process.NIXL_DELAY_ENV, raising=False)
    engine_process.setup_engine_process()
    api.nixlBind.nixlAgent("c", _Config())
    assert created == [("c", 0)]


def test_amx_request_never_raises():
    assert engine_process.request_amx_permission() in (True, False)


def _fake_shm(monkeypatch):
    seen = []

    class SpinCondition:
        """vLLM's writer side, as in vllm 0.32: a PUB socket with SNDHWM=1, bound."""

        def __init__(self, is_reader, context, notify_address, busy_loop_s: float = 1):
            seen.append(busy_loop_s)
            if not is_reader:
                self.local_notify_socket = context.socket(zmq.PUB)
                self.local_notify_socket.setsockopt(zmq.SNDHWM, 1)
                self.local_notify_socket.bind(notify_address)

    shm = types.ModuleType("vllm.distributed.device_communicators.shm_broadcast")
    shm.SpinCondition = SpinCondition
    shm.SHM_READER_RECHECK_INTERVAL_MS = 5000
    comms = types.ModuleType("vllm.distributed.device_communicators")
    comms.shm_broadcast = shm
    for name, mod in (
        ("vllm", types.ModuleType("vllm")),
        ("vllm.distributed", types.ModuleType("vllm.distributed")),
        ("vllm.distributed.device_communicators", comms),
        ("vllm.distributed.device_communicators.shm_broadcast", shm),
    ):
        monkeypatch.setitem(sys.modules, name, mod)
    sys.modules["vllm.distributed"].device_communicators = comms
    return SpinCondition, seen, shm


def test_shm_busy_loop_patch_shortens_reader_spin(monkeypatch, tmp_path):
    spin_condition, seen, shm = _fake_shm(monkeypatch)
    monkeypatch.setenv(engine_process.SHM_BUSY_LOOP_ENV, "0.002")
    engine_process.setup_engine_process()
    context = zmq.Context()
    try:
        spin_condition(True, context, "ipc://unused")
        address = f"ipc://{tmp_path}/notify"
        writer = spin_condition(False, context, address, busy_loop_s=1)
        assert seen == [0.002, 0.002]
        # Short windows make readers idle often: wake-ups must never be dropped, and a lost
        # one must not cost vLLM's 5 s re-check.
        assert writer.local_notify_socket.getsockopt(zmq.SNDHWM) == 1000
        assert shm.SHM_READER_RECHECK_INTERVAL_MS == 50
        reader = context.socket(zmq.SUB)  # still bound where readers will connect
        reader.setsockopt_string(zmq.SUBSCRIBE, "")
        reader.connect(address)
        deadline = time.monotonic() + 5
        while not reader.poll(50) and time.monotonic() < deadline:
            writer.local_notify_socket.send(b"\x00")
        assert reader.recv(zmq.NOBLOCK) == b"\x00"
        reader.close(0)
        writer.local_notify_socket.close(0)
    finally:
        context.term()


def test_shm_busy_loop_untouched_without_setting(monkeypatch):
    spin_condition, seen, shm = _fake_shm(monkeypatch)
    monkeypatch.delenv(engine_process.SHM_BUSY_LOOP_ENV, raising=False)
    engine_process.setup_engine_process()
    spin_condition(True, None, "ipc://x")
    assert seen == [1]
    assert shm.SHM_READER_RECHECK_INTERVAL_MS == 5000


def test_kv_events_patch_binds_host_specific_endpoint(monkeypatch):
    """Unpatched, vLLM's publisher *connects* to tcp://<ip>:<port> (nobody would listen);
    patched, it binds exactly that address and a subscriber receives its events."""
    from vllm.distributed.kv_events import ZmqEventPublisher

    monkeypatch.setattr(ZmqEventPublisher, "_is_bind_endpoint",
                        ZmqEventPublisher.__dict__["_is_bind_endpoint"])
    assert not ZmqEventPublisher._is_bind_endpoint("tcp://127.0.0.1:5557")
    monkeypatch.setattr(ZmqEventPublisher, "_pd_serve_bind_host", False, raising=False)
    monkeypatch.setenv(engine_process.KV_EVENTS_BIND_ENV, "1")
    engine_process.setup_engine_process()
    assert ZmqEventPublisher._is_bind_endpoint("tcp://127.0.0.1:5557")
    assert ZmqEventPublisher._is_bind_endpoint("tcp://*:5557")

    from app.ports import listen_port

    port = listen_port("127.0.0.1")
    pub = ZmqEventPublisher(0, endpoint=f"tcp://127.0.0.1:{port}")
    try:
        import psutil

        listening = {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN and c.pid in (None, psutil.Process().pid)}
        assert ("127.0.0.1", port) in listening
        assert ("0.0.0.0", port) not in listening
    finally:
        pub.shutdown()


class _EngineStub:
    """What ``EngineCoreProc._process_engine_step`` touches: a step that ran no model while
    the scheduler still holds a request (one waiting for its remote KV)."""

    def __init__(self):
        self.output_queue = types.SimpleNamespace(put_nowait=lambda item: None)
        self.scheduler = types.SimpleNamespace(has_requests=lambda: True)

    def step_fn(self):
        return {}, False

    def post_step(self, model_executed):
        pass


def _recorded_sleeps(monkeypatch) -> list[float]:
    """Sleeps reach this list instead of the clock (vLLM's module's own ``time`` too, while
    it is unpatched)."""
    from vllm.v1.engine import core

    slept: list[float] = []
    fake_time = types.SimpleNamespace(sleep=slept.append, monotonic=time.monotonic)
    monkeypatch.setattr(engine_process, "time", fake_time)
    if not isinstance(core.time, engine_process._KvWaitClock):
        monkeypatch.setattr(core, "time", fake_time)
    return slept


def _idle_step_sleeps(monkeypatch) -> list[float]:
    from vllm.v1.engine import core

    slept = _recorded_sleeps(monkeypatch)
    assert core.EngineCoreProc._process_engine_step(_EngineStub()) is False
    return slept


def test_kv_wait_sleep_patch_shortens_vllms_idle_step_sleep(monkeypatch):
    """vLLM's real engine-core step, run on a stub engine: after a step that ran no model
    with a request still waiting, it sleeps the configured time instead of vLLM's 1 ms, and
    every other use of ``time`` in vLLM's module is the real one's."""
    from vllm.v1.engine import core

    monkeypatch.setattr(core, "time", core.time)  # restored after the test
    for env in (engine_process.NIXL_DELAY_ENV, engine_process.SHM_BUSY_LOOP_ENV,
                engine_process.KV_EVENTS_BIND_ENV):
        monkeypatch.delenv(env, raising=False)
    # unpatched: vLLM's own sleep, the value the patch recognises
    assert _idle_step_sleeps(monkeypatch) == [engine_process.VLLM_KV_WAIT_SLEEP_S]

    monkeypatch.setenv(engine_process.KV_WAIT_SLEEP_ENV, "0.0001")
    monkeypatch.setattr(core, "time", time)
    engine_process.setup_engine_process()
    assert isinstance(core.time, engine_process._KvWaitClock)
    assert _idle_step_sleeps(monkeypatch) == [0.0001]
    slept = _recorded_sleeps(monkeypatch)
    core.time.sleep(0.25)  # any other sleep is left as asked
    assert slept == [0.25]
    assert core.time.monotonic is time.monotonic

    clock = core.time
    engine_process.patch_kv_wait_sleep(0.0003)  # again: updates, never wraps twice
    assert core.time is clock
    assert _idle_step_sleeps(monkeypatch) == [0.0003]


def test_kv_ready_at_once_skips_the_idle_sleep_only_after_kv_arrived(monkeypatch):
    """vLLM's real engine-core step and post-step hook, on a stub engine: after a step that
    made a request's KV ready (the scheduler holds it in ``finished_recving_kv_req_ids``)
    the engine core goes straight to the next step; after any other idle step it sleeps as
    before."""
    from vllm.v1.engine import core

    monkeypatch.setattr(core, "time", time)
    monkeypatch.setattr(core.EngineCore, "post_step", core.EngineCore.post_step)
    monkeypatch.setattr(core.EngineCore, "_pd_serve_ready_at_once", False, raising=False)
    monkeypatch.setattr(engine_process, "_KV_READY", [False, frozenset()])

    class ReadyStub(_EngineStub):
        check_for_draft_tokens = async_scheduling = False

        def __init__(self, ready):
            super().__init__()
            self.scheduler.finished_recving_kv_req_ids = ready

        def post_step(self, model_executed):
            core.EngineCore.post_step(self, model_executed)

    def sleeps(ready) -> list[float]:
        slept = _recorded_sleeps(monkeypatch)
        assert core.EngineCoreProc._process_engine_step(ReadyStub(ready)) is False
        return slept

    monkeypatch.setenv(engine_process.KV_READY_AT_ONCE_ENV, "1")
    monkeypatch.delenv(engine_process.KV_WAIT_SLEEP_ENV, raising=False)
    engine_process.setup_engine_process()
    assert sleeps({"req"}) == []
    # the same request still ready (the scheduler could not run it yet): no spinning
    assert sleeps({"req"}) == [engine_process.VLLM_KV_WAIT_SLEEP_S]
    assert sleeps(set()) == [engine_process.VLLM_KV_WAIT_SLEEP_S]
    engine_process.patch_kv_wait_sleep(0.0001)  # with pull's shorter sleep as well
    assert sleeps({"req"}) == []
    assert sleeps({"req", "other"}) == []  # another request's KV arrived
    assert sleeps(set()) == [0.0001]
    post_step = core.EngineCore.post_step
    assert engine_process.patch_kv_ready_at_once() and core.EngineCore.post_step is post_step


def test_kv_wait_sleep_untouched_without_setting(monkeypatch):
    from vllm.v1.engine import core

    monkeypatch.setattr(core, "time", time)
    monkeypatch.delenv(engine_process.KV_WAIT_SLEEP_ENV, raising=False)
    engine_process.setup_engine_process()
    assert core.time is time


# --- a pull decode engine posts a step's KV READs before its forward pass -------------------


def _step_output(reqs_to_recv: dict):
    meta = types.SimpleNamespace(reqs_to_recv=reqs_to_recv)
    return types.SimpleNamespace(kv_connector_metadata=meta, has_sync_kv_loads=False,
                                 finished_req_ids=set())


def _reads_first_scheduler(monkeypatch, setting: str):
    """The plugin applied from the environment over a stand-in for ``Scheduler.schedule``
    (restored after the test) that returns ``self.next_output``."""
    from vllm.v1.core.sched.scheduler import Scheduler

    monkeypatch.setattr(Scheduler, "schedule", lambda self: self.next_output)
    monkeypatch.setattr(Scheduler, "_pd_serve_reads_first", False, raising=False)
    monkeypatch.setenv(engine_process.KV_READS_FIRST_ENV, setting)
    engine_process.setup_engine_process()
    return Scheduler


def test_steps_that_start_reads_post_them_before_the_forward_pass(monkeypatch):
    """The scheduler marks a step that starts READs as having synchronous loads, and vLLM's
    real connector context then posts them before the forward pass it wraps (and after it
    in any other step, as vLLM does)."""
    from vllm.v1.worker import kv_connector_model_runner_mixin as mixin_module

    scheduler = _reads_first_scheduler(monkeypatch, "1")
    stub = types.SimpleNamespace(next_output=_step_output({"r1": object()}))
    reading = scheduler.schedule(stub)
    assert reading.has_sync_kv_loads is True
    stub.next_output = _step_output({})
    assert scheduler.schedule(stub).has_sync_kv_loads is False

    order: list[str] = []
    connector = types.SimpleNamespace(
        bind_connector_metadata=lambda meta: None,
        start_load_kv=lambda ctx: order.append("start_load_kv"),
        wait_for_save=lambda: None, clear_connector_metadata=lambda: None,
        get_transfer_results=lambda finished: types.SimpleNamespace(
            finished_sending=set(), finished_recving=set(), failed_recving=set()),
        get_block_ids_with_load_errors=lambda: set(), get_kv_connector_stats=lambda: None,
        get_kv_connector_kv_cache_events=lambda: None, build_connector_worker_meta=lambda: None)
    monkeypatch.setattr(mixin_module, "get_kv_transfer_group", lambda: connector)
    monkeypatch.setattr(mixin_module, "KVConnectorBase", object)
    monkeypatch.setattr(mixin_module, "get_forward_context", lambda: None)
    mixin = mixin_module.KVConnectorModelRunnerMixin
    for output, expected in ((reading, ["start_load_kv", "forward"]),
                             (_step_output({}), ["forward", "start_load_kv"])):
        order.clear()
        with mixin._get_kv_connector_output(output):
            order.append("forward")
        assert order == expected


def test_reads_keep_vllms_order_without_setting(monkeypatch):
    scheduler = _reads_first_scheduler(monkeypatch, "0")
    stub = types.SimpleNamespace(next_output=_step_output({"r1": object()}))
    assert scheduler.schedule(stub).has_sync_kv_loads is False


# --- a push decode engine drains NIXL notifications while it awaits pushed KV ---------------


def _wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return False


def test_push_notif_poller_wakes_only_while_requests_are_awaited():
    import threading

    awaited: dict[str, int] = {}
    wakes = threading.Semaphore(0)
    poller = engine_process.PushNotifPoller(0.001, lambda: tuple(awaited), wakes.release)
    poller.kick()  # nothing awaited: no thread
    assert poller._thread is None
    awaited["r1"] = 1
    poller.kick()
    assert all(wakes.acquire(timeout=2) for _ in range(5)), "no wake-ups while awaited"
    thread = poller._thread
    poller.kick()  # already polling: the same thread
    assert poller._thread is thread
    awaited.clear()
    thread.join(timeout=2)
    assert not thread.is_alive(), "still polling with nothing awaited"


def test_push_notif_poller_stops_at_stop_and_gives_up_on_a_write_that_never_comes():
    stop = []
    poller = engine_process.PushNotifPoller(0.001, lambda: ("r1",), lambda: None,
                                            stopped=lambda: bool(stop))
    poller.kick()
    stop.append(True)
    poller._thread.join(timeout=2)
    assert not poller._thread.is_alive()

    awaited = {"stuck": 1}
    poller = engine_process.PushNotifPoller(0.001, lambda: tuple(awaited), lambda: None,
                                            give_up_s=0.05)
    poller.kick()
    first = poller._thread
    first.join(timeout=2)
    assert not first.is_alive(), "kept polling past give_up_s"
    poller.kick()  # the same stuck request: not again (every engine step kicks)
    assert poller._thread is first
    awaited["new"] = 1
    poller.kick()  # a request it has not given up on: polls again
    assert poller._thread is not first and poller._thread.is_alive()
    awaited.clear()
    poller._thread.join(timeout=2)


def test_push_decode_worker_drains_notifications_between_steps(monkeypatch):
    """The plugin, applied from the environment, over vLLM's real push worker class with a
    stand-in ``start_load_kv`` (restored after the test): each step's call still runs
    vLLM's, and while the worker awaits pushed KV its writer is woken without further steps;
    applying it again updates the interval, never wraps twice."""
    import threading

    from vllm.distributed.kv_transfer.kv_connector.v1.nixl.push_worker import (
        NixlPushConnectorWorker,
    )

    steps = []
    monkeypatch.setattr(NixlPushConnectorWorker, "start_load_kv",
                        lambda self, metadata: steps.append(metadata.name))
    monkeypatch.setattr(NixlPushConnectorWorker, "_pd_serve_notif_poll_s", None, raising=False)
    monkeypatch.setenv(engine_process.PUSH_NOTIF_POLL_ENV, "0.001")
    engine_process.setup_engine_process()
    wrapped = NixlPushConnectorWorker.start_load_kv

    worker = NixlPushConnectorWorker.__new__(NixlPushConnectorWorker)
    worker._recving_metadata = {}
    worker._push_writer_wake = threading.Event()
    worker._push_writer_stop = threading.Event()
    worker.start_load_kv(_step("step-1"))  # nothing awaited: no polling
    assert steps == ["step-1"] and not worker._push_writer_wake.wait(0.05)
    worker._recving_metadata["req"] = object()
    worker.start_load_kv(_step("step-2"))
    assert steps == ["step-1", "step-2"]
    for _ in range(3):  # woken again and again with no further step
        assert worker._push_writer_wake.wait(2), "writer not woken while KV is awaited"
        worker._push_writer_wake.clear()
    worker._recving_metadata.clear()
    poller = worker._pd_serve_notif_poller
    assert _wait_for(lambda: not poller._thread.is_alive())

    engine_process.patch_push_notif_poll(0.002)
    assert NixlPushConnectorWorker.start_load_kv is wrapped
    assert NixlPushConnectorWorker._pd_serve_notif_poll_s == 0.002
    worker._push_writer_stop.set()


def _step(name: str, **reqs_to_recv):
    import types

    return types.SimpleNamespace(name=name, reqs_to_recv=reqs_to_recv)


def test_push_worker_forgets_receives_that_await_nothing(monkeypatch):
    """vLLM's push worker records a receive with no blocks for a decode request aborted
    before it was scheduled, and nothing ever completes it. The wrapped step drops it (as
    vLLM's pull worker never records it), so no poller waits on it and the source watch
    never fails it as a receive: that crashed the decode engine (IndexError on its empty
    block list) when its prefill engine died. A real receive, blocks or awaiting KV, stays."""
    import threading
    import types

    from vllm.distributed.kv_transfer.kv_connector.v1.nixl.push_worker import (
        NixlPushConnectorWorker,
    )

    def vllms_start_load_kv(self, metadata):  # as vLLM's push worker: records them all
        self._recving_metadata.update(metadata.reqs_to_recv)

    monkeypatch.setattr(NixlPushConnectorWorker, "start_load_kv", vllms_start_load_kv)
    monkeypatch.setattr(NixlPushConnectorWorker, "_pd_serve_notif_poll_s", None, raising=False)
    engine_process.patch_push_notif_poll(0.001)

    def meta(blocks, awaiting=False):
        return types.SimpleNamespace(local_block_ids=blocks, awaiting_kvs=awaiting)

    worker = NixlPushConnectorWorker.__new__(NixlPushConnectorWorker)
    worker._recving_metadata = {}
    worker._push_writer_wake = threading.Event()
    worker._push_writer_stop = threading.Event()
    worker.start_load_kv(_step("aborted", gone=meta([]), gone_hma=meta(([], []))))
    assert worker._recving_metadata == {}
    assert "_pd_serve_notif_poller" not in worker.__dict__ or not (
        worker._pd_serve_notif_poller._thread), "a poller started for receives awaiting nothing"
    real, hit = meta(([3, 4],)), meta([], awaiting=True)
    worker.start_load_kv(_step("live", real=real, hit=hit, gone=meta([])))
    assert worker._recving_metadata == {"real": real, "hit": hit}
    worker._push_writer_stop.set()

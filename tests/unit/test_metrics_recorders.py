"""The Ray recorders construct and record (Ray validates tags at record time), streams pass
through unchanged, engine counters are pushed by the throttle, the request flow reports
prefill outcomes, fallbacks and migrations, and vLLM's Ray stat logger carries ``phase``."""

import asyncio
import types

import pytest

from app.engine_protocol import KIND_ERROR, Head
from app.metrics import ray_metrics
from app.metrics.math import TransferTotals
from app.metrics.ray_metrics import EngineMetrics, FrontMetrics
from app.orchestrator import PDOrchestrator
from app.pd_decision import Route
from tests.unit.test_orchestrator import FakeCompletion, FakeEngine

TOKEN = 'data: {"choices":[{"index":0,"text":"x"}]}\n\n'


class Recorder:
    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args: self.calls.append((name, *args))


class FakeMetric:
    def __init__(self):
        self.calls = []

    def inc(self, value=1.0, tags=None):
        self.calls.append(("inc", value, dict(tags)))

    def observe(self, value, tags=None):
        self.calls.append(("observe", value, dict(tags)))

    def set(self, value, tags=None):
        self.calls.append(("set", value, dict(tags)))


def test_front_metrics_record_with_real_ray_metrics():
    m = FrontMetrics("decode")
    m.answered(0.0, 200, "disaggregated", stream=False)
    m.answered(0.0, 400)  # rejected before routing
    m.prefill_leg("ok", 0.01)
    m.fallback("timeout")
    m.migration("rerun")

    async def chunks():
        for chunk in (TOKEN, TOKEN, "data: [DONE]\n\n"):
            yield chunk

    async def consume():
        return [c async for c in m.stream(chunks(), 0.0, "disaggregated")]

    assert asyncio.run(consume()) == [TOKEN, TOKEN, "data: [DONE]\n\n"]


def test_front_stream_records_once_at_the_end_even_when_closed_early():
    m = FrontMetrics("aggregated")
    fake = {k: FakeMetric() for k in m.m}
    m.m = fake
    closed = []

    async def chunks():
        try:
            for chunk in (TOKEN, TOKEN, TOKEN):
                yield chunk
        finally:
            closed.append(True)

    async def consume_two():
        stream = m.stream(chunks(), 0.0, "aggregated")
        out = [await anext(stream), await anext(stream)]
        await stream.aclose()  # the client left
        return out

    assert len(asyncio.run(consume_two())) == 2
    assert closed == [True]
    assert fake["requests"].calls == [("inc", 1.0, {"phase": "aggregated",
                                                    "route": "aggregated", "stream": "true",
                                                    "status": "200"})]
    assert len(fake["ttft"].calls) == 1 and len(fake["tpot"].calls) == 1
    assert len(fake["e2e"].calls) == 1


def test_front_answered_error_counts_but_records_no_latency():
    m = FrontMetrics("decode")
    fake = {k: FakeMetric() for k in m.m}
    m.m = fake
    m.answered(0.0, 400)
    assert fake["requests"].calls[0][2] == {"phase": "decode", "route": "none",
                                            "stream": "false", "status": "400"}
    assert fake["ttft"].calls == [] and fake["e2e"].calls == []


def test_a_failing_metric_never_raises():
    m = FrontMetrics("decode")

    class Broken:
        def __getattr__(self, name):
            raise RuntimeError("metrics backend broken")

    m.m = {k: Broken() for k in m.m}
    m.answered(0.0, 200, "aggregated")
    m.fallback("error")
    m.migration("failed")
    m.prefill_leg("ok", 0.1)
    e = EngineMetrics("prefill")
    e.m = {k: Broken() for k in e.m}
    e.record(_sched(0, 0), _iteration(), TransferTotals(1, 10, 0, [0.001]))


def _sched(running, waiting, usage=0.25, queries=0, hits=0):
    return types.SimpleNamespace(
        num_running_reqs=running, num_waiting_reqs=waiting, kv_cache_usage=usage,
        prefix_cache_stats=types.SimpleNamespace(queries=queries, hits=hits))


def _iteration(computed=0, cached=0, external=0, gen=0, ttfts=(), finished=()):
    return types.SimpleNamespace(
        prompt_token_stats=types.SimpleNamespace(computed=computed, local_cache_hit=cached,
                                                 external_kv_transfer=external),
        num_generation_tokens=gen, time_to_first_tokens_iter=list(ttfts),
        finished_requests=list(finished))


def test_engine_metrics_push_counters_on_idle_and_gauges_on_change():
    e = EngineMetrics("decode", interval_s=3600)  # only idle or a first value pushes
    fake = {k: FakeMetric() for k in e.m}
    e.m = fake
    done = types.SimpleNamespace(num_generation_tokens=4, mean_time_per_output_token=0.01,
                                 queued_time=0.002)
    e.record(_sched(1, 2, queries=64, hits=32), _iteration(computed=10, external=54, gen=1,
                                                           ttfts=[0.05]),
             TransferTotals(1, 4096, 0, [0.001]))
    assert fake["running"].calls == [("set", 1, {"phase": "decode"})]  # first values
    assert fake["kv_bytes"].calls == [("inc", 4096, {"phase": "decode"})]
    assert fake["kv_seconds"].calls == [("observe", 0.001, {"phase": "decode"})]
    assert fake["ttft"].calls == [("observe", 0.05, {"phase": "decode"})]
    e.record(_sched(2, 1), _iteration(gen=2), TransferTotals(1, 1000, 0, []))  # busy
    assert len(fake["running"].calls) == 1 and len(fake["kv_bytes"].calls) == 1  # held
    e.record(_sched(0, 0, usage=0.0), _iteration(gen=3, finished=[done]), None)  # idle
    assert fake["running"].calls[-1] == ("set", 0, {"phase": "decode"})
    assert fake["kv_bytes"].calls[-1] == ("inc", 1000, {"phase": "decode"})
    assert [c[1] for c in fake["kv_transfers"].calls] == [1, 1]
    assert [c[1] for c in fake["generation_tokens"].calls] == [1, 5]
    assert fake["finished"].calls == [("inc", 1, {"phase": "decode"})]
    assert fake["cache_hits"].calls == [("inc", 32, {"phase": "decode"})]
    sources = {c[2]["source"]: c[1] for c in fake["prompt_tokens"].calls}
    assert sources == {"computed": 10, "external_kv_transfer": 54}
    assert fake["tpot"].calls == [("observe", 0.01, {"phase": "decode"})]
    assert fake["queue"].calls == [("observe", 0.002, {"phase": "decode"})]
    assert fake["kv_failures"].calls == []  # zero: nothing pushed (Ray refuses 0)


def test_engine_metrics_with_real_ray_metrics():
    e = EngineMetrics("prefill")
    e.record(_sched(1, 0, queries=10, hits=5), _iteration(computed=5, cached=5, ttfts=[0.1]),
             TransferTotals(1, 10, 1, [0.002]))
    e.record(_sched(0, 0), _iteration(), None)
    assert all(v == 0 for v in e.pending.values())


def test_metric_objects_are_built_once():
    assert ray_metrics.front_metrics() is ray_metrics.front_metrics()
    assert set(ray_metrics.engine_metrics()) >= {"running", "kv_bytes", "kv_seconds"}


# --- the request flow reports to its observer -------------------------------------------


def _run(orch, request=None):
    return asyncio.run(orch.handle("completion", request or FakeCompletion()))


def test_orchestrator_reports_prefill_leg_and_fallbacks():
    obs = Recorder()
    orch = PDOrchestrator("disaggregated", FakeEngine(), FakeEngine(), observer=obs)
    assert _run(orch).route is Route.DISAGGREGATED
    assert [c[:2] for c in obs.calls] == [("prefill_leg", "ok")]

    obs = Recorder()
    orch = PDOrchestrator("disaggregated", FakeEngine(), FakeEngine(raises=RuntimeError("x")),
                          observer=obs)
    assert _run(orch).route is Route.FALLBACK
    assert [c[:2] for c in obs.calls] == [("prefill_leg", "error"), ("fallback", "error")]

    obs = Recorder()
    orch = PDOrchestrator("disaggregated", FakeEngine(), FakeEngine(delay=0.2),
                          prefill_timeout_s=0.01, observer=obs)
    assert _run(orch).route is Route.FALLBACK
    assert obs.calls[-1] == ("fallback", "timeout")

    obs = Recorder()  # a 4xx from prefill is the client's: no fallback
    bad = FakeEngine(once=Head(KIND_ERROR, 400, {"error": {"message": "too long"}}))
    orch = PDOrchestrator("disaggregated", FakeEngine(), bad, observer=obs)
    assert _run(orch).head.status == 400
    assert [c[:2] for c in obs.calls] == [("prefill_leg", "client_error")]

    obs = Recorder()
    orch = PDOrchestrator("disaggregated", FakeEngine(), None, observer=obs)
    assert _run(orch).route is Route.FALLBACK
    assert obs.calls == [("fallback", "no_prefill")]

    obs = Recorder()
    orch = PDOrchestrator("aggregated", FakeEngine(), None, observer=obs)
    assert _run(orch).route is Route.AGGREGATED
    assert obs.calls == []


def test_migrator_reports_outcomes():
    from app.migration import Migrator

    obs = Recorder()

    async def no_peer(kind, request):
        raise RuntimeError("no peer")
        yield  # pragma: no cover

    mig = Migrator(no_peer, lambda k, b: b, "m", retry_delay_s=0, max_attempts=2, observer=obs)
    with pytest.raises(RuntimeError):
        asyncio.run(mig.rerun("completion", FakeCompletion()))
    assert obs.calls == [("migration", "failed")]

    obs = Recorder()

    async def peer(kind, request):
        yield Head("json", 200, {})

    mig = Migrator(peer, lambda k, b: b, "m", retry_delay_s=0, observer=obs)
    asyncio.run(mig.rerun("completion", FakeCompletion()))
    assert obs.calls == [("migration", "rerun")]


# --- vLLM's Ray stat logger with a phase label ------------------------------------------


def test_vllm_ray_wrappers_carry_phase():
    from vllm.v1.metrics import ray_wrappers as rw
    from vllm.v1.metrics.loggers import AggregateStatLoggerBase, PrometheusStatLogger

    from app.metrics.vllm_logger import _phase_wrapper, phase_stat_logger

    gauge = _phase_wrapper(rw.RayGaugeWrapper, "prefill")(
        "vllm:num_requests_running", "doc", ["model_name", "engine"])
    assert gauge.metric._tag_keys == ("model_name", "engine", "ReplicaId", "phase")
    assert gauge.metric._name == "vllm_num_requests_running"
    labelled = gauge.labels("tiny", "0")
    assert labelled._tags == {"model_name": "tiny", "engine": "0", "ReplicaId": "",
                              "phase": "prefill"}
    labelled.set(3)
    assert gauge.labels(model_name="tiny", engine="0")._tags["phase"] == "prefill"
    with pytest.raises(ValueError):
        gauge.labels("only-one")
    hist = _phase_wrapper(rw.RayHistogramWrapper, "decode")(
        "vllm:time_to_first_token_seconds", "doc", ["model_name", "engine"], [0.1, 1.0])
    hist.labels("tiny", "0").observe(0.2)
    counter = _phase_wrapper(rw.RayCounterWrapper, "decode")("vllm:prompt_tokens", "doc",
                                                              ["model_name", "engine"])
    counter.labels("tiny", "0").inc(5)
    counter.labels("tiny", "0").inc(0)  # vLLM's wrapper skips zero

    served = _phase_wrapper(rw.RayGaugeWrapper, "decode", (("application", "pd"),))(
        "vllm:kv_cache_usage_perc", "doc", ["model_name", "engine"])
    assert served.metric._tag_keys[-2:] == ("phase", "application")
    assert served.labels("tiny", "0")._tags["application"] == "pd"

    cls = phase_stat_logger("decode")
    assert cls is phase_stat_logger("decode")  # one class per phase
    assert issubclass(cls, rw.RayPrometheusStatLogger)
    assert issubclass(cls, PrometheusStatLogger) and issubclass(cls, AggregateStatLoggerBase)
    for attr in ("_gauge_cls", "_counter_cls", "_histogram_cls"):
        assert getattr(cls, attr).__name__.endswith("[decode]")
        assert getattr(cls._kv_connector_cls, attr) is getattr(cls, attr)
    assert cls._spec_decoding_cls._counter_cls is cls._counter_cls
    assert cls._perf_metrics_cls._counter_cls is cls._counter_cls


def test_gauges_are_refreshed_while_idle():
    e = EngineMetrics("decode", interval_s=3600)
    fake = {k: FakeMetric() for k in e.m}
    e.m = fake
    e.refresh()  # nothing seen yet: nothing to push
    assert fake["running"].calls == []
    e.record(_sched(0, 0, usage=0.5), _iteration(), None)
    e.refresh()
    assert fake["running"].calls == [("set", 0, {"phase": "decode"})] * 2
    assert fake["kv_usage"].calls[-1] == ("set", 0.5, {"phase": "decode"})
    e.m = {}
    e.refresh()  # broken metrics: logged, not raised


def test_vllm_gauges_remember_their_last_value():
    from vllm.v1.metrics import ray_wrappers as rw

    from app.metrics import vllm_logger

    gauge = vllm_logger._phase_wrapper(rw.RayGaugeWrapper, "prefill")(
        "vllm:num_requests_waiting", "doc", ["model_name", "engine"]).labels("tiny", "0")
    gauge.set(7)
    assert vllm_logger._LIVE_GAUGES[id(gauge)] == (gauge, 7)
    vllm_logger.refresh_gauges()


def test_vllm_gauges_reach_ray_only_when_they_change_and_labels_are_made_once():
    """vLLM sets each scheduler gauge and relabels some counters on every engine step; the
    front sends Ray a gauge only when its value changes (the second's refresh re-sends it)
    and makes each labelled child once."""
    from vllm.v1.metrics import ray_wrappers as rw

    from app.metrics import vllm_logger

    parent = vllm_logger._phase_wrapper(rw.RayGaugeWrapper, "decode")(
        "vllm:num_requests_running", "doc", ["model_name", "engine"])
    gauge = parent.labels("tiny", "0")
    assert parent.labels("tiny", "0") is gauge
    assert parent.labels(model_name="tiny", engine="0") is not gauge  # other call shape
    other = parent.labels("tiny", "1")
    assert other is not gauge and other._tags["engine"] == "1"
    gauge.metric = other.metric = FakeMetric()
    for value in (2, 2, 2, 3, 3, 2):
        gauge.set(value)
    other.set(2)  # another series: its own last value
    tags = gauge._tags
    assert gauge.metric.calls == [("set", 2, tags), ("set", 3, tags), ("set", 2, tags),
                                  ("set", 2, other._tags)]
    assert vllm_logger._LIVE_GAUGES[id(gauge)] == (gauge, 2)
    gauge.metric.calls.clear()
    vllm_logger.refresh_gauges()  # every gauge re-sent, changed or not
    assert ("set", 2, tags) in gauge.metric.calls and ("set", 2, other._tags) in gauge.metric.calls

    counter = vllm_logger._phase_wrapper(rw.RayCounterWrapper, "decode")(
        "vllm:prompt_tokens_cached_by_source", "doc", ["model_name", "engine", "source"])
    child = counter.labels("tiny", "0", "device")
    assert counter.labels("tiny", "0", "device") is child
    child.metric = FakeMetric()
    child.inc(3)
    counter.labels("tiny", "0", "device").inc(4)  # counters are never skipped
    assert child.metric.calls == [("inc", 3, child._tags), ("inc", 4, child._tags)]


def test_front_observer_calls_defer_to_the_loop_and_answered_async():
    m = FrontMetrics("decode")
    fake = {k: FakeMetric() for k in m.m}
    m.m = fake

    async def flow():
        m.fallback("timeout")
        assert fake["fallbacks"].calls == []  # not on the request's path
        await asyncio.sleep(0)
        await m.answered_async(0.0, 200, "fallback", False, 0.5)

    asyncio.run(flow())
    assert fake["fallbacks"].calls == [("inc", 1.0, {"phase": "decode", "reason": "timeout"})]
    assert fake["ttft"].calls == [("observe", 0.5, {"phase": "decode", "route": "fallback",
                                                    "stream": "false"})]

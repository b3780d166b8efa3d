"""vLLM's own engine metrics through Ray's metrics agent, with a ``phase`` label.

vLLM ships ``RayPrometheusStatLogger`` (what Ray Serve LLM passes as the engine's stat logger
when ``log_engine_metrics`` is on): the same metrics as vLLM's Prometheus logger
(``vllm:num_requests_running``, ``vllm:time_to_first_token_seconds``, KV-cache usage, NIXL
transfer metrics...), recorded as ``ray.util.metrics`` instead of ``prometheus_client`` and
labelled ``model_name``, ``engine`` and ``ReplicaId``. Ray exports them as
``ray_vllm_<name>`` (``:`` is not allowed in Ray metric names).

Its metric wrappers build their tag keys in ``_get_tag_keys`` and tag values in ``__init__`` and
``_build_tags``; :func:`phase_stat_logger` subclasses the three wrappers to append more tags:
``phase`` (the replica's phase) and Ray Serve's ``deployment``/``replica``/``application``
(which ``ray.util.metrics`` does not add, unlike ``ray.serve.metrics``), and a logger class
whose every metric family (scheduler, iteration, KV connector, spec decoding, perf) uses them.
vLLM takes the class itself as a stat-logger factory (an ``AggregateStatLoggerBase``
subclass), and, because it is a ``PrometheusStatLogger``, no longer adds its default
in-process ``prometheus_client`` logger: the engine still runs one Prometheus logger, now
exported.
"""

from __future__ import annotations

import functools
from typing import Any

PHASE_TAG = "phase"


def serve_tags() -> dict[str, str]:
    """The labels ``ray.serve.metrics`` puts on our own metrics (``deployment``, ``replica``,
    ``application``), so vLLM's can be filtered the same way; empty outside a replica."""
    try:
        from ray.serve.metrics import _add_serve_metric_default_tags

        return dict(_add_serve_metric_default_tags({}))
    except Exception:  # noqa: BLE001 - not in a Serve replica, or Ray moved the helper
        return {}


def _phase_wrapper(base: type, phase: str, extra: tuple[tuple[str, str], ...] = ()) -> type:
    from vllm.v1.metrics import ray_wrappers as rw

    added = {PHASE_TAG: phase, **dict(extra)}
    added_keys = tuple(added)

    class PhaseWrapper(base):
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self._tags = {**self._tags, **added}
            self._labelled: dict[Any, Any] = {}
            self._sent: Any = _UNSENT  # a gauge's last value sent to Ray

        def labels(self, *labels: Any, **labelskwargs: Any) -> Any:
            """One labelled child per label values, made once: vLLM relabels some metrics
            on every engine step (a copy and the replica's id looked up each time)."""
            key = (labels, tuple(sorted(labelskwargs.items())))
            child = self._labelled.get(key)
            if child is None:
                child = base.labels(self, *labels, **labelskwargs)
                child._labelled, child._sent = {}, _UNSENT
                self._labelled[key] = child
            return child

        def _get_tag_keys(self, labelnames: list[str] | None) -> tuple[str, ...]:
            return (*rw.RayPrometheusMetric._get_tag_keys(labelnames), *added_keys)

        def _build_tags(self, *labels: Any, **labelskwargs: Any) -> dict[str, str]:
            if labels:  # vLLM's own labels come first in the tag keys
                expected = len(self.metric._tag_keys) - 1 - len(added_keys)  # ReplicaId + ours
                if len(labels) != expected:
                    raise ValueError(f"Expected {expected} labels, got {len(labels)}")
                labelskwargs.update(zip(self.metric._tag_keys, labels, strict=False))
            labelskwargs["ReplicaId"] = rw._get_replica_id() or ""
            labelskwargs.update(added)
            return {k: v if isinstance(v, str) else str(v) for k, v in labelskwargs.items()}

    if issubclass(base, rw.RayGaugeWrapper):
        def set(self, value: float):  # noqa: A001 - vLLM's wrapper API
            """Sent to Ray only when it changes: vLLM sets every scheduler gauge on every
            engine step, mostly to the same value, and each set is a Ray metric record on
            the front's event loop. ``refresh_gauges`` re-sends them all every second."""
            if value == self._sent:
                return None
            self._sent = value
            _LIVE_GAUGES[id(self)] = (self, value)
            return base.set(self, value)

        PhaseWrapper.set = set
    PhaseWrapper.__name__ = PhaseWrapper.__qualname__ = f"{base.__name__}[{phase}]"
    return PhaseWrapper


_UNSENT = object()
# id -> (labelled vLLM gauge, last value): a fixed set (one per gauge and label values).
_LIVE_GAUGES: dict[int, tuple[Any, float]] = {}


def refresh_gauges() -> None:
    """Re-set every vLLM gauge to its last value. Ray drops a gauge series not set for two
    report intervals, and vLLM sets them only on engine steps, so an idle engine's queue and
    KV usage would vanish from Prometheus; the replica calls this every second."""
    for gauge, value in list(_LIVE_GAUGES.values()):
        try:
            gauge.metric.set(value, tags=gauge._tags)
        except Exception:  # noqa: BLE001 - best effort, like every metric here
            pass


@functools.cache
def phase_stat_logger(phase: str, extra_tags: tuple[tuple[str, str], ...] = ()) -> type:
    """A ``RayPrometheusStatLogger`` subclass whose metrics carry ``phase=<phase>`` and
    ``extra_tags`` (the replica's :func:`serve_tags`, passed as sorted pairs)."""
    from vllm.v1.metrics import ray_wrappers as rw

    gauge = _phase_wrapper(rw.RayGaugeWrapper, phase, extra_tags)
    counter = _phase_wrapper(rw.RayCounterWrapper, phase, extra_tags)
    histogram = _phase_wrapper(rw.RayHistogramWrapper, phase, extra_tags)
    spec = type("PhaseSpecDecodingProm", (rw.RaySpecDecodingProm,), {"_counter_cls": counter})
    kv = type("PhaseKVConnectorProm", (rw.RayKVConnectorProm,),
              {"_gauge_cls": gauge, "_counter_cls": counter, "_histogram_cls": histogram})
    perf = type("PhasePerfMetricsProm", (rw.RayPerfMetricsProm,), {"_counter_cls": counter})
    return type(f"PhaseRayPrometheusStatLogger[{phase}]", (rw.RayPrometheusStatLogger,), {
        "_gauge_cls": gauge, "_counter_cls": counter, "_histogram_cls": histogram,
        "_spec_decoding_cls": spec, "_kv_connector_cls": kv, "_perf_metrics_cls": perf,
    })

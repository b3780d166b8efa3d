"""The routing metrics can be built and recorded (Ray validates them at construction), and a
failing stats listener never reaches vLLM's output loop, where it would kill the engine."""

from app.engine_stats import EngineStatsCollector
from app.routing.metrics import inc, record_prediction, replica_metrics, router_metrics


def test_metrics_construct_and_record():
    m = router_metrics()
    m["latency"].observe(0.4)
    inc(m["decisions"], 1, {"route": "disaggregated"})
    inc(m["predicted"], 0, {"pool": "decode"})  # zero: nothing to add, no error
    assert set(replica_metrics()) == {"predicted", "actual", "error"}
    record_prediction("decode", 256, 0)
    record_prediction("prefill", 0, 0)


class _Finished:
    def __init__(self, request_id, cached):
        self.request_id, self.num_cached_tokens = request_id, cached
        self.num_prompt_tokens = cached + 10


class _Iteration:
    def __init__(self, finished):
        self.finished_requests = finished
        self.num_generation_tokens = 0
        self.time_to_first_tokens_iter: list[float] = []
        self.inter_token_latencies_iter: list[float] = []

        class _P:
            total = computed = local_cache_hit = external_kv_transfer = 0

        self.prompt_token_stats = _P()


def test_finished_callback_matches_request_id_and_failures_are_contained():
    collector = EngineStatsCollector(None)
    got = []
    collector.expect_finish("9770b97e9794c1e6", got.append)
    collector.expect_finish("abc", lambda _: 1 / 0)  # must not escape

    def boom():
        raise RuntimeError("listener bug")

    collector.listener = boom
    collector.record(None, _Iteration([_Finished("cmpl-9770b97e9794c1e6-0-1a2b3c4d", 64),
                                       _Finished("cmpl-abc-0", 1)]))
    assert got == [64]

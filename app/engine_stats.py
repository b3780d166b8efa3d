"""Engine statistics a replica reports: prompt-token sources, KV usage, NIXL transfers.

vLLM hands every stat logger the scheduler and iteration stats of each engine step; this one
keeps running totals so a deployment can answer "did this engine really load the prompt's KV
remotely?" and "is its KV cache back to idle?" without scraping Prometheus.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from vllm.v1.metrics.loggers import StatLoggerBase

from app.metrics.math import TransferTotals, fold_transfer_stats
from autoscaling.signals import SignalWindow

log = logging.getLogger("ray.serve")


@dataclass
class EngineCounters:
    prompt_tokens_total: int = 0
    prompt_tokens_computed: int = 0
    prompt_tokens_local_cache_hit: int = 0
    prompt_tokens_external_kv_transfer: int = 0
    generation_tokens: int = 0
    finished_requests: int = 0
    kv_transfers: int = 0
    kv_bytes_transferred: int = 0
    kv_failed_transfers: int = 0
    kv_cache_usage: float = 0.0
    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the local prefix cache
    prefix_cache_hits: int = 0  # ... and found there
    kv_num_blocks: int = 0
    kv_block_size: int = 0


class EngineStatsCollector(StatLoggerBase):
    """A vLLM stat logger that only accumulates; ``snapshot()`` is read by the deployment."""

    def __init__(self, vllm_config: Any, engine_index: int = 0):
        self.counters = EngineCounters()
        self._cache_config = getattr(vllm_config, "cache_config", None)
        self.listener: Callable[[], None] | None = None  # told after every engine step
        # Latencies for the autoscaling signals (autoscaling.signals.SignalWindow).
        self.signals = SignalWindow()
        # Without the KV router nobody knows a prompt's size on arrival: count it at finish.
        self.arrivals_at_finish = True
        # request id -> callback(num_cached_tokens), for router prediction metrics
        self._expected: dict[str, Callable[[int], None]] = {}
        # app.metrics.ray_metrics.EngineMetrics, set by the replica: Prometheus per phase
        self.metrics: Any = None
        # The latest step's NIXL transfers (the handoff timeline: exact at concurrency 1)
        self.last_transfer: TransferTotals | None = None

    def expect_finish(self, request_id: str, callback: Callable[[int], None]) -> None:
        """Call ``callback(num_cached_tokens)`` when a request carrying this id finishes."""
        if len(self._expected) > 10_000:  # requests that never finished here: forget them
            self._expected.clear()
        self._expected[request_id] = callback

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
        c = self.counters
        transfers: TransferTotals | None = None
        if scheduler_stats is not None:
            c.kv_cache_usage = scheduler_stats.kv_cache_usage
            c.num_running_reqs = scheduler_stats.num_running_reqs
            c.num_waiting_reqs = scheduler_stats.num_waiting_reqs
            if scheduler_stats.kv_connector_stats:
                transfers = fold_transfer_stats(scheduler_stats.kv_connector_stats)
                c.kv_transfers += transfers.transfers
                c.kv_bytes_transferred += transfers.bytes
                c.kv_failed_transfers += transfers.failures
                if transfers.transfers:
                    self.last_transfer = transfers
            prefix = scheduler_stats.prefix_cache_stats
            if prefix is not None:
                c.prefix_cache_queries += prefix.queries
                c.prefix_cache_hits += prefix.hits
        if iteration_stats is not None:
            p = iteration_stats.prompt_token_stats
            c.prompt_tokens_total += p.total
            c.prompt_tokens_computed += p.computed
            c.prompt_tokens_local_cache_hit += p.local_cache_hit
            c.prompt_tokens_external_kv_transfer += p.external_kv_transfer
            c.generation_tokens += iteration_stats.num_generation_tokens
            if iteration_stats.time_to_first_tokens_iter:
                self.signals.observe_ttft(iteration_stats.time_to_first_tokens_iter)
            if iteration_stats.inter_token_latencies_iter:
                self.signals.observe_itl(iteration_stats.inter_token_latencies_iter)
            c.finished_requests += len(iteration_stats.finished_requests)
            if self.arrivals_at_finish:
                for finished in iteration_stats.finished_requests:
                    self.signals.observe_arrival(finished.num_prompt_tokens
                                                 - finished.num_cached_tokens)
            if self._expected:
                for finished in iteration_stats.finished_requests:
                    self._on_finished(finished)
        if self.metrics is not None:
            self.metrics.record(scheduler_stats, iteration_stats, transfers)  # never raises
        if self.listener is not None:
            _guarded(self.listener)

    def _on_finished(self, finished: Any) -> None:
        # vLLM derives its internal ids from the OpenAI request_id plus '-'-joined affixes.
        for rid in _ID_PARTS.split(finished.request_id or ""):
            callback = self._expected.pop(rid, None)
            if callback is not None:
                _guarded(callback, finished.num_cached_tokens)
                return

    def log_engine_initialized(self) -> None:
        pass

    def snapshot(self) -> dict[str, Any]:
        if self._cache_config is not None:
            self.counters.kv_num_blocks = self._cache_config.num_gpu_blocks or 0
            self.counters.kv_block_size = self._cache_config.block_size or 0
        return asdict(self.counters)


_ID_PARTS = re.compile(r"[-_]")


def _guarded(fn: Callable[..., None], *args: Any) -> None:
    """Run a listener inside vLLM's output loop: an exception there kills the engine
    (EngineDeadError for every later request), so a failing listener is logged, never raised."""
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - see docstring
        log.exception("engine stats listener failed")

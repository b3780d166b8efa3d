"""Observability: per-phase Prometheus metrics exported through Ray's metrics agent.

- :mod:`app.metrics.math`: pure metric math (stream timings, label choice, NIXL stat folding,
  gauge throttling); no Ray, no vLLM.
- :mod:`app.metrics.definitions`: every metric's name, type, labels and buckets (pure specs),
  the single list the dashboard test checks PromQL against.
- :mod:`app.metrics.observer`: the hooks the Ray-free request flow calls (no-op by default).
- :mod:`app.metrics.ray_metrics`: the specs as Ray metrics (created lazily, in replicas).
- :mod:`app.metrics.vllm_logger`: vLLM's own engine metrics through Ray, with a ``phase`` label.
"""

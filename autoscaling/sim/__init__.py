"""A fast discrete-event model of the serving pools with the autoscaler in the loop.

Pure Python (no Ray, no numpy): replays a trace through prefill/decode (or aggregated) engine
replicas whose step times come from a capacity :class:`~autoscaling.profile_model.Profile`,
and lets a policy (ours through the very ``PDAppPolicy`` Ray runs, or a baseline) resize
the pools every tick. One module per job:

- :mod:`.events`: the event loop (a heap of timed callbacks);
- :mod:`.workload`: simulated requests and trace loading (compression, peak window);
- :mod:`.engines`: vLLM-like continuous-batching replicas (prefill, decode, aggregated);
- :mod:`.telemetry`: per-replica signals with the keys of :mod:`autoscaling.signals`,
  averaged over the look-back window as Ray does;
- :mod:`.pool`: a deployment's replicas: routing, start-up, draining, replica-seconds;
- :mod:`.drivers`: the policies in the loop (ours, Ray's default, Dynamo-style, fixed);
- :mod:`.cluster`: wires requests, pools and the driver together and runs the replay;
- :mod:`.report`: SLO attainment, goodput, percentiles and the replica plot.
"""

from autoscaling.sim.cluster import SimConfig, SimResult, simulate
from autoscaling.sim.workload import SimRequest, load_trace

__all__ = ["SimConfig", "SimRequest", "SimResult", "load_trace", "simulate"]

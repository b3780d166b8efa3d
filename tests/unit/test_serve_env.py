"""The Ray settings the app starts with, and the launcher that passes them to a command."""

import os
import subprocess
import sys

from app.serve_env import CLIENT_TIMEOUT_ENV, RETRY_ON_ENV, serve_env


def test_settings_put_haproxy_in_front_with_bounded_client_wait_and_replays():
    env = serve_env(local=True)
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert env[CLIENT_TIMEOUT_ENV] == "60"
    assert env[RETRY_ON_ENV].split() == ["conn-failure", "empty-response"]
    assert env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "1"
    assert "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S" not in serve_env(local=False)


def test_explicit_environment_wins(monkeypatch):
    monkeypatch.setenv(CLIENT_TIMEOUT_ENV, "15")
    monkeypatch.setenv(RETRY_ON_ENV, "conn-failure")
    env = serve_env()
    assert env[CLIENT_TIMEOUT_ENV] == "15" and env[RETRY_ON_ENV] == "conn-failure"


def test_launcher_runs_command_with_values_containing_spaces():
    """`python -m app.serve_env --local CMD` (make run): `env $(...)` would split the retry
    keywords into words and try to run the second as the command."""
    out = subprocess.run(
        [sys.executable, "-m", "app.serve_env", "--local", sys.executable, "-c",
         f"import os; print(os.environ[{RETRY_ON_ENV!r}])"],
        capture_output=True, text=True, check=True, timeout=60,
        env={k: v for k, v in os.environ.items() if k != RETRY_ON_ENV})
    assert out.stdout.strip() == "conn-failure empty-response"


def test_without_command_prints_shell_quoted_assignments():
    out = subprocess.run([sys.executable, "-m", "app.serve_env"], capture_output=True,
                         text=True, check=True, timeout=60,
                         env={k: v for k, v in os.environ.items() if k != RETRY_ON_ENV})
    assert f"{RETRY_ON_ENV}='conn-failure empty-response'" in out.stdout.splitlines()

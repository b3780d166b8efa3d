"""Servers under test as child processes: start with a log, wait until they answer, stop.

Each server runs in a process session of its own, so stopping it signals exactly what it
started (Ray's workers, vLLM's engine processes) and nothing else on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from app.serve_env import serve_env


def serve_run_command(config_path: Path) -> list[str]:
    """Ray's ``serve run`` CLI, run with this interpreter."""
    return [sys.executable, "-m", "ray.serve.scripts", "run", str(config_path)]


def start_serve_run(config_path: Path, log: Path, cwd: str | Path, env: dict[str, str],
                    fast_ingress: bool = True):
    """``serve run`` the app; with ``fast_ingress``, with the Ray settings it is fastest with
    (``app.serve_env``: HAProxy, its side listeners on free ports), else Ray's defaults."""
    ray_env = serve_env(local=True, isolated=True) if fast_ingress else {}
    return start_logged(serve_run_command(config_path), log, cwd, {**env, **ray_env})


def repo_env() -> dict[str, str]:
    """This environment with the repository root first on PYTHONPATH, so ``serve run``
    imports ``app`` from this checkout."""
    from loadtests.traces import repo_root

    env = dict(os.environ)
    root = str(repo_root())
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def start_logged(
    command: Sequence[str], log: Path, cwd: str | Path | None = None, env: dict | None = None
) -> subprocess.Popen[bytes]:
    """Start ``command`` in a new session with stdout and stderr going to ``log``.

    SIGINT is reset to its default in the child: a shell's background job (CI, ``nohup``)
    ignores it and children inherit that, and then :func:`stop_process_group`'s Ctrl-C would
    do nothing and the server would only die by SIGTERM, skipping its clean shutdown.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as log_fh:
        return subprocess.Popen(list(command), cwd=cwd, env=env, stdout=log_fh,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_default_sigint)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_ready(base: str, model: str, proc: subprocess.Popen[bytes], log: Path,
               timeout: float) -> None:
    """Poll ``/v1/models`` until ``model`` is listed and a two-token completion succeeds."""
    deadline = time.monotonic() + timeout
    last = ""
    with httpx.Client(base_url=base, timeout=30, trust_env=False) as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"the server exited ({proc.returncode}); log tail:\n{log_tail(log)}")
            try:
                models = [m["id"] for m in http.get("/v1/models").json().get("data", [])]
                if model in models:
                    resp = http.post("/v1/completions", json={
                        "model": model, "prompt": "hello", "max_tokens": 2})
                    if resp.status_code == 200:
                        return
                    last = f"HTTP {resp.status_code}: {resp.text[:200]}"
            except (httpx.HTTPError, ValueError) as exc:
                last = type(exc).__name__
            time.sleep(2)
    raise TimeoutError(f"server not ready after {timeout:.0f} s ({last}); log tail:\n"
                       f"{log_tail(log)}")


def stop_process_group(proc: subprocess.Popen[bytes], host: str | None = None,
                       port: int | None = None, grace_s: float = 120) -> None:
    """Ctrl-C the server (``serve run`` then shuts Serve and its Ray down), then clear its
    process group, then wait for its port to be free again."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace_s)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break  # nothing left in the group
        time.sleep(5)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)
    if host and port:
        deadline = time.monotonic() + 60
        while not port_free(host, port) and time.monotonic() < deadline:
            time.sleep(1)
    time.sleep(3)  # let workers exit before the next server takes the cores


@contextlib.contextmanager
def running_app(config: dict[str, Any], work: Path, name: str, host: str, port: int,
                served_name: str, timeout: float = 900) -> Iterator[tuple[str, Any, Path]]:
    """``serve run`` the config (as the scenario does) until the block exits."""
    import yaml

    from loadtests.traces import repo_root

    work.mkdir(parents=True, exist_ok=True)
    config_path = work / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    if not port_free(host, port):
        raise RuntimeError(f"{host}:{port} is in use")
    log = work / f"{name}.log"
    proc = start_serve_run(config_path, log, str(repo_root()), repo_env())
    base = f"http://{host}:{port}"
    try:
        t0 = time.monotonic()
        wait_ready(base, served_name, proc, log, timeout)
        print(f"{name}: ready after {time.monotonic() - t0:.0f} s", file=sys.stderr)
        yield base, proc, log
    finally:
        stop_process_group(proc, host, port)


def apply_overrides(app_args: dict[str, Any], items: list[str]) -> dict[str, Any]:
    """``--set SECTION.KEY=JSON`` (the benches' experiment switch) applied to app args;
    deeper paths (``prefill.engine_args.max_num_batched_tokens=512``) set nested keys."""
    for item in items:
        path, _, value = item.partition("=")
        *sections, key = path.split(".")
        node = app_args
        for section in sections:
            node = node.setdefault(section, {})
        node[key] = json.loads(value)
    return app_args


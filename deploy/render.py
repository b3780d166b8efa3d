"""Keep the deployment manifests in sync with their sources of truth.

The hand-written manifests carry generated regions, each between a ``# >>> <name>`` and a
``# <<< <name>`` comment line (the region takes the marker's indentation), plus the KubeRay
``serveConfigV2: |`` block:

- ``serveConfigV2`` (deploy/kuberay/rayservice.yaml): serve_configs/gpu_heterogeneous.yaml,
  verbatim (comments included);
- ``ray-env`` (every Ray container of the RayService): the Ray settings of
  ``app/serve_env.py`` (``serve_env()``, not ``--local``) plus the Hugging Face token from a
  Secret;
- ``env_vars`` and ``serve-config`` (deploy/anyscale/service.yaml): the same settings, and the
  serve config's ``proxy_location``, ``logging_config`` and ``applications`` (Anyscale sets
  the HTTP host and port itself and rejects them in ``http_options``);
- ``ray-env`` (deploy/Dockerfile): the same settings as ``ENV``, so that any platform that
  starts Ray from the image gets them.

::

    python -m deploy.render           # rewrite the generated regions
    python -m deploy.render --check   # exit 1 if a committed manifest is out of date

tests/unit/test_deploy_manifests.py runs the check.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVE_CONFIG = ROOT / "serve_configs" / "gpu_heterogeneous.yaml"
RAYSERVICE = ROOT / "deploy" / "kuberay" / "rayservice.yaml"
ANYSCALE_SERVICE = ROOT / "deploy" / "anyscale" / "service.yaml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"

# Kubernetes Secret holding the Hugging Face token (gated models such as Llama 3.1).
HF_SECRET_NAME, HF_SECRET_KEY = "hf-token", "token"
# Top-level keys of the serve config that an Anyscale service takes (no http_options: Anyscale
# owns the HTTP host and port and rejects host/port/root_path).
ANYSCALE_SERVE_KEYS = ("proxy_location", "logging_config", "applications")


def ray_env() -> dict[str, str]:
    """``serve_env()`` for a multi-node cluster, independent of this shell's environment
    (``serve_env`` lets exported RAY_SERVE_* values win; the manifests carry the defaults)."""
    from app.serve_env import serve_env

    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("RAY_SERVE_")}
    try:
        return serve_env()
    finally:
        os.environ.update(saved)


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def replace_region(text: str, name: str, make: Callable[[str], list[str]]) -> str:
    """Replace the lines between ``# >>> name`` and ``# <<< name`` with ``make(indent)``."""
    pattern = re.compile(
        rf"^(?P<indent>[ \t]*)# >>> {re.escape(name)}\b[^\n]*\n(?P<body>.*?)"
        rf"^(?P=indent)# <<< {re.escape(name)}\b[^\n]*$", re.M | re.S)
    matches = list(pattern.finditer(text))
    if not matches:
        raise ValueError(f"no '# >>> {name}' ... '# <<< {name}' region")
    out, last = [], 0
    for m in matches:
        body_start, body_end = m.start("body"), m.start("body") + len(m.group("body"))
        out.append(text[last:body_start])
        out.append("".join(line + "\n" for line in make(m.group("indent"))))
        last = body_end
    out.append(text[last:])
    return "".join(out)


def replace_block_scalar(text: str, key: str, content: str) -> str:
    """Replace the body of the literal block ``<indent>key: |`` with ``content``."""
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        m = re.match(rf"^(?P<indent>[ ]*){re.escape(key)}: \|[-+]?\s*$", line)
        if not m:
            continue
        indent = len(m.group("indent"))
        end = i + 1
        while end < len(lines) and (not lines[end].strip()
                                    or len(lines[end]) - len(lines[end].lstrip(" ")) > indent):
            end += 1
        while end > i + 1 and not lines[end - 1].strip():  # keep blank lines after the block
            end -= 1
        pad = " " * (indent + 2)
        body = [pad + row + "\n" if row.strip() else "\n" for row in content.splitlines()]
        return "".join(lines[:i + 1] + body + lines[end:])
    raise ValueError(f"no '{key}: |' block")


def top_level_sections(yaml_text: str) -> dict[str, str]:
    """Each top-level key's text (its line and the indented/comment lines under it)."""
    sections: dict[str, list[str]] = {}
    current: str | None = None
    for line in yaml_text.splitlines():
        m = re.match(r"^([A-Za-z_][\w-]*):", line)
        if m:
            current = m.group(1)
            sections[current] = [line]
        elif current is not None and (line.startswith((" ", "\t")) or not line.strip()):
            sections[current].append(line)
        else:  # a column-0 comment: belongs to what follows
            current = None
    return {k: "\n".join(v).rstrip() for k, v in sections.items()}


def k8s_env_lines(indent: str) -> list[str]:
    lines = []
    for key, value in ray_env().items():
        lines += [f"{indent}- name: {key}", f"{indent}  value: {_quote(value)}"]
    lines += [f"{indent}- name: HF_TOKEN", f"{indent}  valueFrom:",
              f"{indent}    secretKeyRef: {{name: {HF_SECRET_NAME}, key: {HF_SECRET_KEY}}}"]
    return lines


def render_rayservice(text: str) -> str:
    text = replace_block_scalar(text, "serveConfigV2", SERVE_CONFIG.read_text())
    return replace_region(text, "ray-env", k8s_env_lines)


def render_anyscale(text: str) -> str:
    text = replace_region(text, "env_vars", lambda indent: [
        f"{indent}{key}: {_quote(value)}" for key, value in ray_env().items()])
    sections = top_level_sections(SERVE_CONFIG.read_text())
    serve_lines = "\n".join(sections[key] for key in ANYSCALE_SERVE_KEYS).splitlines()
    return replace_region(text, "serve-config", lambda indent: [
        indent + row if row.strip() else "" for row in serve_lines])


def render_dockerfile(text: str) -> str:
    return replace_region(text, "ray-env", lambda indent: [
        f"{indent}ENV {key}={_quote(value)}" for key, value in ray_env().items()])


RENDERERS: dict[Path, Callable[[str], str]] = {
    RAYSERVICE: render_rayservice,
    ANYSCALE_SERVICE: render_anyscale,
    DOCKERFILE: render_dockerfile,
}


def render_all() -> dict[Path, tuple[str, str]]:
    """``{path: (committed text, rendered text)}``."""
    out = {}
    for path, render in RENDERERS.items():
        committed = path.read_text()
        out[path] = (committed, render(committed))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if a manifest differs from its rendering")
    args = parser.parse_args(argv)
    stale = []
    for path, (committed, rendered) in render_all().items():
        if committed == rendered:
            continue
        stale.append(path.relative_to(ROOT))
        if not args.check:
            path.write_text(rendered)
    if args.check and stale:
        print("out of date (run python -m deploy.render): "
              + ", ".join(map(str, stale)), file=sys.stderr)
        return 1
    for path in stale:
        print(f"rendered {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Optional bearer-token authentication for the OpenAI endpoints.

Keys come from an environment variable (comma-separated) and/or a file (one per line, ``#``
comments); with none configured the endpoints are open. Comparison is constant-time over
SHA-256 digests, so neither a key's content nor its length leaks through timing, and keys
never reach logs.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path


class APIKeys:
    def __init__(self, keys: list[str]):
        self._digests = [_digest(k) for k in keys]

    @classmethod
    def load(cls, env_var: str | None, file: str | None) -> APIKeys:
        keys: list[str] = []
        if env_var:
            keys += [k.strip() for k in os.environ.get(env_var, "").split(",") if k.strip()]
        if file:
            path = Path(file)
            if not path.is_file():
                raise FileNotFoundError(
                    f"server.api_keys_file {file!r} does not exist on this node; create it "
                    f"(one key per line) or unset server.api_keys_file")
            for line in path.read_text().splitlines():
                line = line.split("#", 1)[0].strip()
                if line:
                    keys.append(line)
            if not keys:
                raise ValueError(f"server.api_keys_file {file!r} holds no key")
        return cls(keys)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def allows(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header value carries a known key (``Bearer <key>``)."""
        if not self._digests:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        got = _digest(token.strip())
        ok = False
        for d in self._digests:  # no early exit: the time does not tell which key matched
            ok |= hmac.compare_digest(got, d)
        return ok


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()

"""Streaming client for OpenAI-compatible ``/v1/completions`` endpoints (httpx).

Prompts go out as token-id lists by default (``prompt: [int, ...]``): exact lengths and no
tokenizer round trip. ``text`` mode turns ids into text through the server's ``/detokenize``
and checks the length with ``/tokenize`` (plain vLLM servers), for endpoints that only take
strings. Every failure becomes an error string on the record; nothing raises past
:meth:`CompletionsClient.stream` except cancellation.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable
from typing import Any, Literal

import httpx

from loadtests.metrics import RequestRecord
from loadtests.prompts import TokenSpace, random_tokens
from loadtests.workloads import Request

PromptFormat = Literal["ids", "text"]
_MAX_ERROR_CHARS = 300


def sse_data(line: str) -> str | None:
    """The payload of an SSE ``data:`` line; ``None`` for comments, blanks and other fields."""
    if not line.startswith("data:"):
        return None
    return line[5:].strip()


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 3] + "..."


def _error_detail(body: str) -> str:
    """The message of an OpenAI-style error body, else the body itself."""
    try:
        obj = json.loads(body)
    except ValueError:
        return _short(body)
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, dict) and "message" in err:
            return _short(str(err["message"]))
        if isinstance(err, str):
            return _short(err)
        if "detail" in obj:
            return _short(str(obj["detail"]))
    return _short(body)


def api_root(target: str) -> str:
    """``http://host:port`` from a target given with or without ``/v1``."""
    root = target.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


class CompletionsClient:
    """One connection pool for a run; unlimited connections so the client never queues."""

    def __init__(
        self,
        target: str,
        model: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float = 600.0,
        prompt_format: PromptFormat = "ids",
        ignore_eos: bool = True,
        extra_body: dict[str, Any] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.model = model
        self.prompt_format = prompt_format
        self.ignore_eos = ignore_eos
        self.extra_body = dict(extra_body or {})
        self._http = httpx.AsyncClient(
            base_url=api_root(target),
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 30.0)),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
            trust_env=False,  # never send loopback benchmarks through a proxy
            transport=transport,
        )

    async def __aenter__(self) -> CompletionsClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # ---- server discovery -------------------------------------------------------------

    async def list_models(self) -> list[str]:
        resp = await self._http.get("/v1/models")
        resp.raise_for_status()
        return [m["id"] for m in resp.json().get("data", [])]

    async def resolve_model(self) -> str:
        """``--model`` if given, else the server's only (first) model."""
        if self.model:
            return self.model
        models = await self.list_models()
        if not models:
            raise RuntimeError("the server lists no models; pass --model")
        self.model = models[0]
        return self.model

    async def accepts_token(self, token_id: int) -> bool:
        """Whether a one-token prompt ``[token_id]`` is accepted (False on HTTP 400)."""
        resp = await self._http.post(
            "/v1/completions",
            json={"model": self.model, "prompt": [token_id], "max_tokens": 1, "stream": False},
        )
        if resp.status_code == 200:
            return True
        if resp.status_code == 400:
            return False
        raise RuntimeError(f"probe failed: HTTP {resp.status_code}: {_error_detail(resp.text)}")

    async def probe_vocab_size(self, limit: int = 1 << 24) -> int:
        """Vocabulary size found by galloping + bisection over one-token prompts (~2 log2 V
        tiny requests), for servers that expose no tokenizer metadata."""
        if not await self.accepts_token(0):
            raise RuntimeError(
                "the server rejects token-id prompts; use --prompt-format text, or give "
                "--vocab-size/--token-range"
            )
        good, bad = 0, 256
        while bad < limit and await self.accepts_token(bad):
            good, bad = bad, bad * 2
        if bad >= limit:
            return limit
        while bad - good > 1:
            mid = (good + bad) // 2
            if await self.accepts_token(mid):
                good = mid
            else:
                bad = mid
        return good + 1

    async def tokenize(self, text: str) -> list[int]:
        resp = await self._http.post(
            "/tokenize", json={"model": self.model, "prompt": text, "add_special_tokens": False}
        )
        resp.raise_for_status()
        return list(resp.json()["tokens"])

    async def detokenize(self, tokens: list[int]) -> str:
        resp = await self._http.post("/detokenize", json={"model": self.model, "tokens": tokens})
        resp.raise_for_status()
        return str(resp.json()["prompt"])

    async def to_text(self, request: Request, space: TokenSpace, seed: int) -> None:
        """Give ``request`` a text prompt that re-tokenizes to exactly its length, if a few
        trim/pad rounds get there (BPE may merge across the joins); else the closest."""
        target = request.prompt_len
        rng = random.Random(f"loadtests-text:{seed}:{request.request_id}")
        tokens = list(request.prompt)
        text = await self.detokenize(tokens)
        for _ in range(6):
            tokens = await self.tokenize(text)
            if len(tokens) == target:
                break
            if len(tokens) > target:
                tokens = tokens[:target]
            else:
                tokens = tokens + random_tokens(rng, target - len(tokens), space)
            text = await self.detokenize(tokens)
        request.prompt = tokens
        request.prompt_text = text

    # ---- measured requests ------------------------------------------------------------

    def payload(self, request: Request, max_tokens: int | None = None) -> dict[str, Any]:
        text = self.prompt_format == "text" and request.prompt_text is not None
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": request.prompt_text if text else request.prompt,
            "max_tokens": max_tokens or request.output_len,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": 0.0,
        }
        if text:
            body["add_special_tokens"] = False  # lengths were matched without BOS
        if self.ignore_eos:
            body["ignore_eos"] = True
        body.update(self.extra_body)
        return body

    async def stream(
        self,
        request: Request,
        record: RequestRecord,
        clock: Callable[[], float],
        max_tokens: int | None = None,
    ) -> None:
        """Send ``request`` and fill ``record`` from the stream (times from ``clock``)."""
        start = clock()
        record.start_time = start
        last = start
        chunk_tokens = 0
        usage_out: int | None = None
        try:
            async with self._http.stream(
                "POST", "/v1/completions", json=self.payload(request, max_tokens)
            ) as resp:
                if resp.status_code != 200:
                    body = (await resp.aread()).decode(errors="replace")
                    record.error = f"HTTP {resp.status_code}: {_error_detail(body)}"
                    return
                async for line in resp.aiter_lines():
                    data = sse_data(line)
                    if data is None or not data:
                        continue
                    if data == "[DONE]":
                        break
                    obj = json.loads(data)
                    if obj.get("error"):
                        record.error = f"stream error: {_error_detail(data)}"
                        return
                    if choices := obj.get("choices"):
                        now = clock()
                        if record.ttft is None:
                            record.ttft = now - start
                        else:
                            record.itl.append(now - last)
                        last = now
                        chunk_tokens += len(choices[0].get("token_ids") or ()) or 1
                    if usage := obj.get("usage"):
                        usage_out = usage.get("completion_tokens", usage_out)
                        if usage.get("prompt_tokens") is not None:
                            record.prompt_len = int(usage["prompt_tokens"])
        except asyncio.CancelledError:
            record.error = "cancelled"
            raise
        except httpx.TimeoutException as exc:
            record.error = f"timeout ({type(exc).__name__})"
            return
        except Exception as exc:  # every failure is reported on the record, never raised
            record.error = f"{type(exc).__name__}: {_short(str(exc))}"
            return
        if record.ttft is None:
            record.error = "stream ended without any token"
            return
        record.latency = last - start
        record.output_len = int(usage_out) if usage_out is not None else chunk_tokens
        record.success = True

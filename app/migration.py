"""Requests survive the death of the engine serving them: retried or migrated to a peer.

When a replica's vLLM engine dies (a worker OOM-killed, a GPU fault) the replica's HTTP side
still holds every request's connection. Each request then continues on another replica of
the same deployment:

- nothing sent to the client yet (non-streaming, or a stream before its first chunk): the
  request runs again, whole, on a peer (local prefill there);
- a stream already under way: the tokens sent so far are appended to the prompt and the
  request continues on a peer as a completion of that token sequence; its chunks are
  rewritten into the original stream (same id, chat or completion format, one final
  ``usage`` counting the original prompt and every generated token). Greedy decoding gives
  the tokens an unbroken run gives. A stream lost in the middle of a multi-byte character
  (its last tokens are UTF-8 bytes whose text vLLM held back) continues after the last
  token whose text was sent; the peer regenerates the rest, and their ids are not repeated.

Up to ``max_migrations`` hand-overs per request, then a clean error event and ``[DONE]``.
Not migrated (a clean error instead): ``n > 1``, beam search, tool calls, stop strings
(vLLM holds back text that might start one, so the text sent and the tokens generated
differ). Logprobs of continued chunks are dropped; presence/frequency penalties restart.

The engine-side bookkeeping is :class:`TokenLedger`, which sees every ``RequestOutput`` on its
way to vLLM's serving layer. Nothing here imports Ray or vLLM.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from app.metrics.observer import NULL_OBSERVER, FlowObserver

log = logging.getLogger("ray.serve")

ERROR_PREFIX = 'data: {"error"'
DONE = "data: [DONE]\n\n"

# Fields a continuation copies from the original request (both kinds have them).
_SAMPLING_FIELDS = (
    "temperature", "top_p", "top_k", "min_p", "seed", "repetition_penalty",
    "presence_penalty", "frequency_penalty", "stop_token_ids", "ignore_eos",
    "skip_special_tokens", "spaces_between_special_tokens", "priority", "allowed_token_ids",
    "bad_words", "logit_bias",
)


class EngineLost(Exception):
    """This replica's engine died while serving the request: ``prompt_ids`` and the
    ``generated_ids`` already sent to the client let a peer continue it. The client has the
    text of the first ``whole`` of them; the text of the rest (bytes of a UTF-8 character not
    yet complete) was held back by vLLM's detokenizer."""

    def __init__(self, prompt_ids: list[int] | None = None,
                 generated_ids: list[int] | None = None, whole: int | None = None):
        super().__init__("engine died while serving the request")
        self.prompt_ids = list(prompt_ids or [])
        self.generated_ids = list(generated_ids or [])
        self.whole = len(self.generated_ids) if whole is None else whole

    def __reduce__(self):  # crosses Ray as itself, not as a bare Exception
        return (EngineLost, (self.prompt_ids, self.generated_ids, self.whole))


def text_is_whole(text: str | None) -> bool:
    """Whether a chunk's text ends on a whole character: vLLM's detokenizer holds back a
    token that is one byte of a longer UTF-8 character (empty text, or U+FFFD)."""
    return bool(text) and not text.endswith("\ufffd")


class TokenLedger:
    """Prompt and generated token ids of every request in flight on one engine.

    :meth:`wrap` wraps the engine's ``generate``; an entry leaves when its request ends
    normally or is cancelled, and stays after an engine error until :meth:`take` (the
    migration reads it then)."""

    def __init__(self) -> None:
        # engine request id -> [prompt ids, generated ids, tokens with whole text, text length]
        self._live: dict[str, list] = {}

    def wrap(self, generate: Callable[..., AsyncIterator[Any]],
             is_delta: Callable[[Any], bool]) -> Callable[..., AsyncIterator[Any]]:
        live = self._live

        async def recording(prompt, sampling_params, request_id, *args, **kwargs):
            entry = live[request_id] = [None, [], 0, 0]
            delta = is_delta(sampling_params)
            failed = False
            try:
                async for out in generate(prompt, sampling_params, request_id, *args,
                                          **kwargs):
                    if entry[0] is None:
                        entry[0] = list(getattr(out, "prompt_token_ids", None) or [])
                    outputs = getattr(out, "outputs", None)
                    if outputs:
                        _record(entry, outputs[0], delta)
                    yield out
            except Exception:
                failed = True
                raise
            finally:
                if not failed:
                    live.pop(request_id, None)

        return recording

    def take(self, request_key: str) -> tuple[list[int], list[int], int] | None:
        """(prompt ids, generated ids, how many of those have their text sent) of the
        request whose client-level id is ``request_key`` (vLLM's engine id for it:
        ``cmpl-<id>-0`` or ``chatcmpl-<id>``), removing it."""
        for rid in engine_ids(request_key):
            entry = self._live.pop(rid, None)
            if entry is not None:
                return list(entry[0] or []), list(entry[1]), entry[2]
        return None

    def __len__(self) -> int:
        return len(self._live)


def _record(entry: list, output: Any, delta: bool) -> None:
    text = getattr(output, "text", None)
    if delta:
        entry[1].extend(output.token_ids)
        new_text = text
    else:  # cumulative outputs: ids and text so far
        entry[1] = list(output.token_ids)
        new_text = (text or "")[entry[3]:]
        entry[3] = len(text or "")
    if text is None or text_is_whole(new_text):
        entry[2] = len(entry[1])


def engine_ids(request_key: str) -> tuple[str, ...]:
    """vLLM's engine request id for a request whose ``request_id`` field is ``request_key``:
    ``cmpl-<id>-0`` (completion), ``chatcmpl-<id>`` (chat), or the key itself."""
    return (f"cmpl-{request_key}-0", f"chatcmpl-{request_key}", request_key)


def migratable(kind: str, body: dict[str, Any]) -> str | None:
    """Why a request cannot continue elsewhere mid-stream, or None if it can."""
    if (body.get("n") or 1) != 1 or body.get("use_beam_search"):
        return "n > 1 or beam search"
    if body.get("stop"):
        return "stop strings"
    if kind == "chat" and (body.get("tools") or body.get("response_format")):
        return "tool calls or a response format"
    return None


def continuation_body(kind: str, body: dict[str, Any], prompt_ids: list[int],
                      generated_ids: list[int], model: str) -> dict[str, Any]:
    """A completion request that continues ``body`` after ``generated_ids``: the prompt's
    token ids plus those, the remaining token budget, the same sampling."""
    out: dict[str, Any] = {k: body[k] for k in _SAMPLING_FIELDS if body.get(k) is not None}
    done = len(generated_ids)
    limit = body.get("max_completion_tokens") if kind == "chat" else None
    limit = limit if limit is not None else body.get("max_tokens")
    if limit is not None:
        out["max_tokens"] = max(int(limit) - done, 1)
    if body.get("min_tokens"):
        out["min_tokens"] = max(int(body["min_tokens"]) - done, 0)
    if kind == "completion" and body.get("logprobs") is not None:
        out["logprobs"] = body["logprobs"]
    out.update(model=model, prompt=list(prompt_ids) + list(generated_ids), stream=True,
               stream_options={"include_usage": True}, return_token_ids=True, echo=False)
    return out


class ContinuationFormatter:
    """Rewrites a continuation's completion chunks into the original stream's format."""

    def __init__(self, kind: str, original: dict[str, Any] | None, model: str,
                 prompt_tokens: int, generated_before: int, include_usage: bool,
                 token_ids: bool = False, resent: int = 0):
        """``resent``: how many of the continuation's first token ids the client already
        has (tokens regenerated because their text had not been sent): left out of the
        ``token_ids`` it is given again."""
        original = original or {}
        self.resent = resent
        self.token_ids = token_ids  # the client asked for return_token_ids
        self.kind, self.model = kind, original.get("model", model)
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        self.id = original.get("id") or f"{prefix}-{uuid.uuid4().hex}"
        self.created = original.get("created") or int(time.time())
        self.prompt_tokens, self.before = prompt_tokens, generated_before
        self.include_usage = include_usage

    def usage(self, usage: dict[str, Any]) -> dict[str, Any]:
        completion = self.before + int(usage.get("completion_tokens") or 0)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def convert(self, data: dict[str, Any]) -> tuple[str | None, list[int]]:
        """(the SSE event to send or None, the token ids this chunk generated)."""
        choices = data.get("choices") or []
        new_ids = [t for c in choices for t in (c.get("token_ids") or [])]
        if not choices:  # the final usage chunk
            if not self.include_usage or not data.get("usage"):
                return None, new_ids
            out = self.envelope([])
            out["usage"] = self.usage(data["usage"])
            return sse_event(out), new_ids
        converted = []
        for c in choices:
            if self.kind == "chat":
                item = {"index": c.get("index", 0), "delta": {"content": c.get("text", "")},
                        "logprobs": None, "finish_reason": c.get("finish_reason"),
                        "stop_reason": c.get("stop_reason")}
            else:
                item = {"index": c.get("index", 0), "text": c.get("text", ""),
                        "logprobs": c.get("logprobs"), "finish_reason": c.get("finish_reason"),
                        "stop_reason": c.get("stop_reason")}
            if self.token_ids:
                ids = c.get("token_ids") or []
                skip = min(self.resent, len(ids))
                self.resent -= skip
                item["token_ids"] = ids[skip:]
            converted.append(item)
        out = self.envelope(converted)
        if data.get("usage") and self.include_usage:  # continuous_usage_stats
            out["usage"] = self.usage(data["usage"])
        return sse_event(out), new_ids

    def role_chunk(self) -> dict[str, Any]:
        """A chat stream's first chunk, as vLLM sends it: the assistant role, no text."""
        return self.envelope([{"index": 0, "delta": {"role": "assistant", "content": ""},
                               "logprobs": None, "finish_reason": None}])

    def envelope(self, choices: list) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices}


def sse_event(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def error_event(message: str) -> str:
    return sse_event({"error": {"message": message, "type": "ServiceUnavailable", "param": None,
                           "code": 503}})


def parse_event(chunk: str) -> dict[str, Any] | None:
    """The JSON of one ``data: {...}`` SSE event (None for ``[DONE]`` or anything else)."""
    text = chunk.strip()
    if not text.startswith("data: {"):
        return None
    try:
        return json.loads(text[6:])
    except ValueError:
        return None


# What a replica gives the migrator: run (kind, request) on a peer, yielding the engine
# protocol's items (a Head, then SSE strings when streaming).
PeerStream = Callable[[str, Any], AsyncIterator[Any]]


class Migrator:
    """Runs the hand-overs for one replica; ``peer`` reaches another replica's engine and
    ``to_request(kind, body)`` validates a request body into the engine's request model."""

    def __init__(self, peer: PeerStream, to_request: Callable[[str, dict], Any],
                 model: str, max_migrations: int = 2, retry_delay_s: float = 0.5,
                 max_attempts: int = 12, observer: FlowObserver = NULL_OBSERVER):
        """``observer``: told each migration's outcome (``app.metrics``)."""
        self.observer = observer
        self.peer, self.to_request, self.model = peer, to_request, model
        self.max_migrations, self.retry_delay_s = max_migrations, retry_delay_s
        self.max_attempts = max_attempts
        self.migrations = 0  # hand-overs that produced output, for stats
        self.outcomes = {"rerun": 0, "continued": 0, "refused": 0, "failed": 0}  # stats

    def _outcome(self, outcome: str) -> None:
        self.outcomes[outcome] += 1
        self.observer.migration(outcome)

    async def rerun(self, kind: str, request: Any) -> tuple[Any, AsyncIterator[str] | None]:
        """The whole request on a peer (nothing was sent yet): its Head, and its chunks when
        it streams."""
        fresh = request.model_copy(update={"kv_transfer_params": None})
        last: BaseException | None = None
        for attempt in range(self.max_attempts):
            stream = self.peer(kind, fresh)
            try:
                head = await anext(stream)
            except Exception as exc:  # noqa: BLE001 - a dead or gone peer: try another
                last = exc
                await _close(stream)
                await asyncio.sleep(self.retry_delay_s * min(attempt + 1, 4))
                continue
            self.migrations += 1
            self._outcome("rerun")
            log.warning("engine lost before any output: request re-run on a peer")
            if getattr(head, "kind", None) == "stream":
                return head, _rest(stream)
            await _close(stream)
            return head, None
        self._outcome("failed")
        raise RuntimeError(f"no peer replica could take the request ({last!r})")

    async def guard(self, kind: str, request: Any, chunks: AsyncIterator[str]
                    ) -> AsyncIterator[str]:
        """``chunks`` as sent, continued on a peer if this replica's engine dies."""
        first = None
        try:
            async for chunk in chunks:
                if first is None:
                    first = chunk
                yield chunk
            return
        except EngineLost as exc:
            lost = exc
        finally:
            await _close(chunks)
        body = request.model_dump(exclude_unset=False)
        why = migratable(kind, body)
        if why is not None:
            self._outcome("refused")
            log.warning("engine lost mid-stream; request not migrated (%s)", why)
            yield error_event(f"the engine serving this request failed; {why} cannot "
                              f"continue elsewhere: retry the request")
            yield DONE
            return
        if first is None and not lost.prompt_ids:
            # The engine never saw it: the whole request again, its chunks as they come.
            try:
                head, rest = await self.rerun(kind, request)
            except RuntimeError as exc:
                yield error_event(f"the engine serving this request failed: {exc}")
                yield DONE
                return
            if rest is None:
                yield error_event(json.dumps(getattr(head, "body", None))[:300])
                yield DONE
                return
            async for chunk in rest:
                yield chunk
            return
        async for chunk in self._continue(kind, body, lost, parse_event(first or "")):
            yield chunk

    async def _continue(self, kind: str, body: dict[str, Any], lost: EngineLost,
                        original: dict[str, Any] | None) -> AsyncIterator[str]:
        prompt, generated = lost.prompt_ids, list(lost.generated_ids)
        # The peer continues after the tokens whose text the client has: continuing after a
        # byte of an unfinished UTF-8 character would make its detokenizer, primed on a
        # prompt ending mid-character, emit text of the prompt (measured with token 1).
        whole = lost.whole
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        migrations, attempts = 0, 0
        if kind == "chat" and original is None:  # nothing sent: the role chunk first
            role = ContinuationFormatter(kind, None, self.model, 0, 0, False)
            original = {"id": role.id, "created": role.created, "model": role.model}
            yield sse_event(role.role_chunk())
        while migrations < self.max_migrations and attempts < self.max_attempts:
            attempts += 1
            sent, generated = generated, generated[:whole]  # sent: the ids the client has
            cont = continuation_body(kind, body, prompt, generated, self.model)
            fmt = ContinuationFormatter(kind, original, self.model, len(prompt),
                                        len(generated), include_usage,
                                        bool(body.get("return_token_ids")), len(sent) - whole)
            stream = self.peer("completion", self.to_request("completion", cont))
            produced = False
            try:
                head = await anext(stream)
                if getattr(head, "kind", "stream") != "stream":
                    raise RuntimeError(f"peer answered {getattr(head, 'status', '?')}")
                async for chunk in stream:
                    data = parse_event(chunk)
                    if data is None:
                        continue  # [DONE]: ours comes last
                    if "error" in data:
                        raise RuntimeError(str(data["error"].get("message"))[:200])
                    event, ids = fmt.convert(data)
                    generated += ids
                    if ids:
                        produced = True
                        if any(text_is_whole(c.get("text")) for c in data["choices"]):
                            whole = len(generated)
                    if event is not None:
                        yield event
                yield DONE
                self.migrations += 1
                self._outcome("continued")
                log.warning("stream migrated to a peer after %d tokens", len(lost.generated_ids))
                return
            except Exception as exc:  # noqa: BLE001 - the peer died too, or was this replica
                log.warning("migration attempt %d failed: %s: %s", attempts,
                            type(exc).__name__, exc)
                if produced:
                    migrations += 1
                await asyncio.sleep(self.retry_delay_s * min(attempts, 4))
            finally:
                await _close(stream)
            generated += sent[len(generated):]
        self._outcome("failed")
        yield error_event("the engine serving this request failed and no other replica "
                          "could continue it; retry the request")
        yield DONE


async def _rest(stream: AsyncIterator[Any]) -> AsyncIterator[str]:
    try:
        async for item in stream:
            yield item
    finally:
        await _close(stream)


async def _close(stream: Any) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:  # noqa: BLE001 - closing a broken stream
            pass


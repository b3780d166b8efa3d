"""Stream the prefill engine's first token at once; decode continues after it.

The prefill engine samples token 1 anyway (its leg runs with ``max_tokens`` 1). If the client
waits for the decode engine to sample it again, the whole handoff (prefill reply, decode
admission, NIXL read, decode's first step) sits in the time to first token. Here the front
sends prefill's token as the stream's first chunk and asks decode for a *continuation*: a
completion of the prompt's token ids plus that token, carrying the prefill's KV params. The
NixlConnector reads the prompt's blocks as before; decode computes only the new token's KV,
which its first step computes anyway (vLLM recomputes the last prompt token after a full
remote hit). The handoff then overlaps the client reading token 1: it moves from TTFT to the
gap before token 2 (measured in docs/BENCHMARKS.md, ``bench:handoff``).

Taken only where the continuation is exactly the request (otherwise the usual path, where
decode samples token 1 itself): a stream, one choice, no logprobs, no stop strings (vLLM holds
back text that may start one), no tools / response formats / structured outputs, no echo,
no presence or frequency penalty (they count output tokens: token 1 would become a prompt
token), no bad words, no continuous usage stats. After prefill: token 1 did not finish the
request and is whole text (not one byte of a longer character), and the prompt does not
end on a KV block boundary (one more token would need one more block than prefill holds,
which vLLM's connector cannot match). Nothing here imports Ray or vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.migration import ContinuationFormatter, continuation_body, sse_event

_STRUCTURED = ("tools", "response_format", "structured_outputs", "guided_json",
               "guided_regex", "guided_choice", "guided_grammar", "guided_decoding_backend")


def ineligible(kind: str, body: dict[str, Any]) -> str | None:
    """Why the request cannot take the first-token fast path, or None if it can."""
    if not body.get("stream"):
        return "not streamed"
    if (body.get("n") or 1) != 1 or body.get("use_beam_search"):
        return "n > 1 or beam search"
    limit = body.get("max_completion_tokens") if kind == "chat" else None
    limit = limit if limit is not None else body.get("max_tokens")
    if limit is not None and int(limit) <= 1:
        return "one token asked for"
    if body.get("stop"):
        return "stop strings"
    if any(body.get(k) for k in _STRUCTURED):
        return "tools, response format or structured output"
    if kind == "chat":
        if body.get("logprobs") or body.get("top_logprobs"):
            return "logprobs"
    elif body.get("logprobs") is not None:
        return "logprobs"
    if body.get("echo") or body.get("prompt_logprobs"):
        return "echo or prompt logprobs"
    if body.get("presence_penalty") or body.get("frequency_penalty"):
        return "presence or frequency penalty"
    if body.get("bad_words"):
        return "bad words"
    if (body.get("stream_options") or {}).get("continuous_usage_stats"):
        return "continuous usage stats"
    return None


@dataclass(frozen=True)
class PrefillToken:
    """What the prefill leg's response says about the prompt and token 1."""

    response_id: str
    created: int
    model: str
    prompt_ids: list[int]
    token_id: int
    text: str
    finish_reason: str | None

    @classmethod
    def parse(cls, kind: str, body: dict[str, Any]) -> PrefillToken | None:
        """None if the response lacks what the fast path needs (token ids not returned)."""
        choices = body.get("choices") or []
        if len(choices) != 1:
            return None
        choice = choices[0]
        if kind == "chat":
            prompt_ids = body.get("prompt_token_ids")
            text = (choice.get("message") or {}).get("content") or ""
        else:
            prompt_ids = choice.get("prompt_token_ids")
            text = choice.get("text") or ""
        token_ids = choice.get("token_ids") or []
        if not prompt_ids or len(token_ids) != 1:
            return None
        return cls(str(body.get("id") or ""), int(body.get("created") or 0),
                   str(body.get("model") or ""), list(prompt_ids), int(token_ids[0]), text,
                   choice.get("finish_reason"))

    def continues(self, block_size: int, max_model_len: int = 0) -> str | None:
        """Why decode cannot continue after this token, or None if it can."""
        if self.finish_reason not in (None, "length"):
            return f"token 1 finished the request ({self.finish_reason})"
        if not self.text or "\ufffd" in self.text:
            # A byte of a longer UTF-8 character (or a special token): vLLM's detokenizer,
            # primed on a prompt ending mid-character, emits the prompt's text (measured).
            return "token 1 is not whole text"
        if block_size > 0 and len(self.prompt_ids) % block_size == 0:
            return "prompt ends on a KV block boundary"
        if max_model_len and len(self.prompt_ids) + 1 >= max_model_len:
            return "no room for a token after token 1"
        return None


def decode_continuation(kind: str, body: dict[str, Any], first: PrefillToken, model: str,
                        kv_transfer_params: dict[str, Any]) -> dict[str, Any]:
    """The decode leg's completion request: prompt ids + token 1, the prefill's KV params."""
    cont = continuation_body(kind, body, first.prompt_ids, [first.token_id], model)
    cont["kv_transfer_params"] = kv_transfer_params
    return cont


def formatter(kind: str, body: dict[str, Any], first: PrefillToken,
              model: str) -> ContinuationFormatter:
    """Rewrites the continuation's chunks into the client's stream (id, format, usage)."""
    original = {"id": first.response_id, "created": first.created, "model": body.get("model")
                or model}
    return ContinuationFormatter(
        kind, original, model, len(first.prompt_ids), 1,
        bool((body.get("stream_options") or {}).get("include_usage")),
        bool(body.get("return_token_ids")))


def first_chunks(kind: str, body: dict[str, Any], first: PrefillToken,
                 fmt: ContinuationFormatter) -> list[str]:
    """The SSE events that carry token 1, shaped as vLLM's own first chunks."""
    token_ids = bool(body.get("return_token_ids"))
    if kind == "chat":
        role = fmt.role_chunk()
        if token_ids:
            role["prompt_token_ids"] = first.prompt_ids
        item: dict[str, Any] = {"index": 0, "delta": {"content": first.text},
                                "logprobs": None, "finish_reason": None}
        if token_ids:
            item["token_ids"] = [first.token_id]
        return [sse_event(role), sse_event(fmt.envelope([item]))]
    item = {"index": 0, "text": first.text, "logprobs": None, "finish_reason": None,
            "stop_reason": None}
    if token_ids:
        item["prompt_token_ids"] = first.prompt_ids
        item["token_ids"] = [first.token_id]
    return [sse_event(fmt.envelope([item]))]

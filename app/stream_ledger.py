"""What a front in its own process knows of a stream it relays from a decode replica.

With ``front.mode: separate`` the HTTP front and the decode engine live in different
processes, so the engine's :class:`app.migration.TokenLedger` dies with the engine's replica.
The front keeps its own ledger instead, from the chunks themselves: it asks decode for
``return_token_ids`` (vLLM then puts the prompt's ids on the first chunk and each chunk's
generated ids on its choice) and, when the client did not ask for them, hides them again
before the chunk goes out. When the replica dies mid-stream, :meth:`StreamLedger.lost` is
exactly what the client has, and the migrator continues from there. No Ray, no vLLM.
"""

from __future__ import annotations

import json
from typing import Any

from app.migration import EngineLost, parse_event, text_is_whole

_ID_FIELDS = ("prompt_token_ids", "token_ids")


class StreamLedger:
    """One stream's prompt ids, generated ids and how many of those the client has text of.

    ``hide_ids``: the client did not ask for token ids; they were asked for on its behalf,
    so they are set back to null (vLLM's value when not asked), and the chat chunks vLLM
    sends only because ids were asked for (an empty delta: a token whose text is held back)
    are dropped.
    """

    def __init__(self, kind: str, hide_ids: bool):
        self.kind, self.hide_ids = kind, hide_ids
        self.prompt_ids: list[int] = []
        self.generated: list[int] = []
        self.whole = 0

    def relay(self, chunk: str) -> str | None:
        """Record ``chunk``; the chunk to send the client, or None to send nothing."""
        data = parse_event(chunk)
        if data is None or "error" in data:
            return chunk  # [DONE], or an error event: as is
        if data.get("prompt_token_ids"):  # chat: on the role chunk
            self.prompt_ids = list(data["prompt_token_ids"])
        choices = data.get("choices") or []
        keep = []
        for c in choices:
            if c.get("prompt_token_ids"):  # completion: on the first chunk's choice
                self.prompt_ids = list(c["prompt_token_ids"])
            ids = c.get("token_ids") or []
            text = (c.get("delta") or {}).get("content") if self.kind == "chat" else c.get("text")
            if ids:
                self.generated.extend(ids)
                if text_is_whole(text):
                    self.whole = len(self.generated)
            if not self.hide_ids:
                keep.append(c)
            elif not (self.kind == "chat" and _only_ids(c)):
                keep.append(_without_ids(c))
        if not self.hide_ids:
            return chunk
        if choices and not keep:
            return None
        out = {k: (None if k in _ID_FIELDS else v) for k, v in data.items()}
        if choices:
            out["choices"] = keep
        return f"data: {json.dumps(out, ensure_ascii=False, separators=(',', ':'))}\n\n"

    def lost(self) -> EngineLost:
        """The stream broke here: what a peer needs to continue it."""
        return EngineLost(self.prompt_ids, self.generated, self.whole)


def _without_ids(choice: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if k in _ID_FIELDS else v) for k, v in choice.items()}


def _only_ids(choice: dict[str, Any]) -> bool:
    """A chat choice vLLM sends only because token ids were asked for: nothing in its delta,
    no finish, no logprobs."""
    return (not choice.get("delta") and choice.get("finish_reason") is None
            and choice.get("logprobs") is None)

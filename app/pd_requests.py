"""Derive the prefill leg and the decode leg from a client's validated OpenAI request.

The prefill engine must compute exactly the prompt's KV and keep it for the decode engine to
read; the decode engine must produce what the client asked for, starting from that KV.
"""

from __future__ import annotations

from typing import Any

# vLLM's NixlConnector: the prefill engine keeps the blocks for a remote reader.
PREFILL_KV_PARAMS: dict[str, Any] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


def client_request(request: Any) -> Any:
    """Drop fields only the server may set: a client-supplied ``kv_transfer_params`` would let
    it make an engine read any remote blocks."""
    if getattr(request, "kv_transfer_params", None) is None:
        return request
    return request.model_copy(update={"kv_transfer_params": None})


def prefill_request(kind: str, request: Any) -> Any:
    """One generated token, no streaming, nothing echoed: the prompt's KV, plus token 1 and
    the prompt's token ids for the first-token fast path (app.handoff.first_token)."""
    update: dict[str, Any] = {
        "max_tokens": 1,
        "min_tokens": min(getattr(request, "min_tokens", 0) or 0, 1),  # token 1 may be sent
        "stream": False,
        "stream_options": None,
        "n": 1,
        "return_token_ids": True,
        "kv_transfer_params": dict(PREFILL_KV_PARAMS),
    }
    if kind == "chat":
        update["max_completion_tokens"] = 1
    else:
        update["echo"] = False
    fields = type(request).model_fields
    return request.model_copy(update={k: v for k, v in update.items() if k in fields})


def decode_request(request: Any, kv_transfer_params: dict[str, Any]) -> Any:
    """The client's request, plus where its prompt's KV blocks wait to be read."""
    return request.model_copy(update={"kv_transfer_params": kv_transfer_params})

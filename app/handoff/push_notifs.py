"""Reading vLLM's push messages, for the engine-process patches that act on them.

vLLM matches a decode registration to a prefill request by *base* request id (its own random
suffixes stripped), and carries the registration as a msgpack map behind a prefix; early push
and push refusals both need those two readings, the same way vLLM does them.
"""

from __future__ import annotations

from typing import Any


def base_request_id(request_id: str) -> str:
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl.utils import get_base_request_id

    return get_base_request_id(request_id)


def same_request(a: str, b: str) -> bool:
    return a == b or base_request_id(a) == base_request_id(b)


def registration(notif: bytes) -> dict[str, Any] | None:
    """The registration map a ``PUSH_REG`` notification carries, or None if unreadable
    (vLLM logs a bad notification itself)."""
    import msgspec
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl.metadata import (
        PUSH_REG_NOTIF_PREFIX,
    )

    try:
        reg = msgspec.msgpack.decode(notif[len(PUSH_REG_NOTIF_PREFIX):])
    except Exception:  # noqa: BLE001
        return None
    return reg if isinstance(reg, dict) and isinstance(reg.get("request_id"), str) else None

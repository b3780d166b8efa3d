"""Errors in the OpenAI wire format: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse


def error_body(
    message: str, err_type: str = "BadRequestError", code: int = 400, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def error_response(
    message: str,
    err_type: str = "BadRequestError",
    code: int = 400,
    param: str | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(message, err_type, code, param), code)


def validation_message(exc: Exception) -> tuple[str, str | None]:
    """Readable message and offending field from a pydantic ValidationError, or from vLLM's
    VLLMValidationError (which carries ``parameter``), or any other error."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        items = errors()
        if items:
            first = items[0]
            loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
            msg = first.get("msg", str(exc))
            return (f"{loc}: {msg}" if loc else msg), (loc or None)
    return str(exc), getattr(exc, "parameter", None)

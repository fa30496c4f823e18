"""Every error the server answers, in OpenAI's shape: ``{"error": {message, type, param,
code}}``, with the HTTP status in ``code`` (and ``Retry-After`` on 429).

Example::

    error_response(FieldError("interventions[0].layers", "layer 40 is out of range"))
    # 400 {"error": {"message": "interventions[0].layers: layer 40 ...", "param": ...}}
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi.responses import JSONResponse

from vinterp_server.compile import FieldError
from vinterp_server.limits import LimitExceeded


def error_body(message: str, status: int, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    phrase = HTTPStatus(status).phrase.replace(" ", "")
    return {"error": {"message": message, "type": f"{phrase}Error" if not phrase.endswith(
        "Error") else phrase, "param": param, "code": status}}


def error_response(exc: Any, retry_after: int | None = None) -> JSONResponse:
    """An exception, a vLLM ``ErrorResponse`` or an error dict as a JSON response."""
    headers: dict[str, str] = {}
    if isinstance(exc, dict):          # an error event from vLLM's stream
        err = exc.get("error", {})
        status = int(err.get("code") or 500)
        body = {"error": err}
    elif hasattr(exc, "error") and hasattr(exc, "model_dump"):   # vLLM's ErrorResponse
        status = int(exc.error.code)
        body = exc.model_dump()
    elif isinstance(exc, FieldError):
        status, body = 400, error_body(str(exc), 400, exc.field)
    elif isinstance(exc, LimitExceeded):
        status, body = 429, error_body(str(exc), 429)
    elif isinstance(exc, ValueError):
        status, body = 400, error_body(str(exc), 400)
    else:
        status, body = 500, error_body(str(exc), 500)
    retry = retry_after or getattr(exc, "retry_after", None)
    if status == 429:
        headers["Retry-After"] = str(retry or 1)
    return JSONResponse(body, status_code=status, headers=headers)

"""Every error the server answers, in OpenAI's shape: ``{"error": {message, type, param,
code}}``, with the HTTP status in ``code`` (and ``Retry-After`` on 429 and 503).

Example::

    error_response(FieldError("interventions[0].layers", "layer 40 is out of range"))
    # 400 {"error": {"message": "interventions[0].layers: layer 40 ...", "param": ...}}
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from fastapi.responses import JSONResponse
from vllm.exceptions import VLLMValidationError

from vinterp_server.compile import FieldError
from vinterp_server.limits import LimitExceeded, TooLarge
from vinterp_server.store import StoreUnavailable


class EngineUnavailable(Exception):
    """The engine cannot take requests (it died, or no engine replica is healthy): 503, with
    ``Retry-After`` (a restarted server or a replaced replica can take the request)."""

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = max(1, int(retry_after))

    def __reduce__(self) -> tuple[Any, ...]:   # (crosses from a Ray replica with its wait)
        return (type(self), (str(self), self.retry_after))


class FieldRefused(VLLMValidationError):
    """A :class:`FieldError` raised where vLLM's serving layer answers it (inside the engine
    client: per-prompt checks): vLLM answers a validation error with a 400 whose ``param`` is
    the field, as the server's own 400s do (its ``GracefulHTTPError`` would leave ``param``
    empty). The message is the ``FieldError``'s own, which names the field already."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message, parameter=field)

    @classmethod
    def of(cls, exc: FieldError) -> FieldRefused:
        """``exc`` as vLLM's validation error."""
        return cls(str(exc), exc.field)

    def __str__(self) -> str:   # (vLLM's adds "(parameter=...)": the message has it first)
        return str(self.args[0])

    def __reduce__(self) -> tuple[Any, ...]:   # (crosses from a Ray replica)
        return (type(self), (str(self), self.parameter))


def sse_json(chunk: str | None) -> dict[str, Any] | None:
    """The JSON object an SSE chunk of vLLM's stream carries (``data: {...}``), else ``None``
    (``data: [DONE]``, a comment, a chunk that is not JSON)."""
    if chunk is None or not chunk.startswith("data: {"):
        return None
    try:
        return json.loads(chunk[len("data: "):])
    except ValueError:
        return None


def error_event(chunk: str | None) -> dict[str, Any] | None:
    """The error in an SSE chunk of vLLM's stream (``data: {"error": ...}``), else ``None``."""
    if chunk is None or not chunk.startswith("data: {\"error\""):
        return None
    return sse_json(chunk)


def error_body(message: str, status: int, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    phrase = HTTPStatus(status).phrase.replace(" ", "")
    return {"error": {"message": message, "type": f"{phrase}Error" if not phrase.endswith(
        "Error") else phrase, "param": param, "code": status}}


def is_client_error(exc: Any) -> bool:
    """vLLM's own "the request is wrong" errors (an empty prompt, ...), wherever they are
    raised: some come from its request models' validators, before any route runs."""
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:   # (a vLLM without the class)
        return False
    return isinstance(exc, VLLMClientError)


def status_for(exc: BaseException) -> int:
    """The HTTP status an exception answers with."""
    if isinstance(exc, FieldError):
        return 400
    if isinstance(exc, TooLarge):
        return 413
    if isinstance(exc, LimitExceeded):
        return 429
    if isinstance(exc, (EngineUnavailable, StoreUnavailable)):
        return 503
    if isinstance(exc, ValueError) or is_client_error(exc):
        return 400
    return 500


def _phrase(status: int) -> str | None:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return None


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
    else:
        status = status_for(exc)
        # (vLLM's validation errors, e.g. from its request validators, name theirs too)
        param = exc.field if isinstance(exc, FieldError) else getattr(exc, "parameter", None)
        body = error_body(str(exc), status, param if isinstance(param, str) else None)
    err = body["error"]
    if isinstance(err, dict) and err.get("type") == _phrase(status):
        # vLLM names a GracefulHTTPError's type by its bare phrase ("Request Entity Too
        # Large"); the server's own errors and vLLM's others say "...Error"
        err["type"] = error_body("", status)["error"]["type"]
    retry = retry_after or getattr(exc, "retry_after", None)
    if status in (429, 503):
        headers["Retry-After"] = str(retry or 1)
    return JSONResponse(body, status_code=status, headers=headers)

"""The FastAPI app: routes, auth, errors. How the engine is hosted is not its business.

:func:`build_app` takes an :class:`~vinterp_server.engine.EngineHost` (the embedded
:class:`~vinterp_server.engine.LocalEngineHost`, or a Ray deployment's), the API keys and a
:class:`~vinterp_server.store.Store`. Every route but ``/health`` and ``/metrics`` needs a key
when keys are configured. Every error is OpenAI-shaped: ``{"error": {"message", "type",
"param", "code"}}``, a bad field named in ``param`` and in the message.

Example::

    app = build_app(host, ApiKeys.load("keys.txt"), MemoryStore())
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vinterp.ir import IR_VERSION
from vinterp_server import captures, metrics, openai_routes, traces, vectors
from vinterp_server.auth import ApiKeys
from vinterp_server.context import Server, Settings, require_key
from vinterp_server.engine import EngineHost, engine_down
from vinterp_server.errors import (
    EngineUnavailable, error_body, error_response, is_client_error,
)
from vinterp_server.store import MemoryStore, Store, StoreUnavailable

_log = logging.getLogger(__name__)

DESCRIPTION = """vinterp: an OpenAI-compatible server whose requests can read and change the
model's activations. `interventions`, `capture` and `graph` are top-level request fields
(`extra_body` with the openai client); every user's request shares one continuous batch."""


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes (413) before they are read whole."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _send_json(send, 413, error_body(
                f"the request body has {int(declared)} bytes; the limit is {self.limit}", 413))
            return
        seen = 0
        refused = False

        async def limited() -> Message:
            # a body without Content-Length (chunked) is counted as it arrives; past the
            # limit the 413 is sent here and the app sees the client gone (raising instead
            # would reach FastAPI's body parsing, which answers any error with a 400)
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                refused = True
                await _send_json(send, 413, error_body(
                    f"the request body is over the limit of {self.limit} bytes", 413))
                return {"type": "http.disconnect"}
            return message

        async def unless_refused(message: Message) -> None:
            if not refused:   # (the app's own answer to the "disconnect" is dropped)
                await send(message)

        try:
            await self.app(scope, limited, unless_refused)
        except Exception:
            if not refused:
                raise


class Unexpected:
    """Answer what no route handled (``/v1/stats`` on a dead engine, vLLM refusing an empty
    prompt in its request validators, a bug) with an OpenAI-shaped error, and keep the
    connection open.

    Not ``@app.exception_handler(Exception)``: Starlette runs that handler in its outermost
    middleware, which re-raises after answering, so uvicorn logged every such 4xx as a crash
    and closed the keep-alive connection (the client's next request on it was reset)."""

    def __init__(self, app: ASGIApp, host: EngineHost) -> None:
        self.app = app
        self.host = host

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as exc:
            if started:   # the status is sent: nothing to answer with but a dropped body
                raise
            response = await self.answer(exc)
            await response(scope, receive, send)

    async def answer(self, exc: Exception) -> JSONResponse:
        """``exc`` as a response: a vLLM client error as its 4xx, else the engine's 503
        when it is down, else a 500 naming the error (logged: it is the server's fault)."""
        if is_client_error(exc):
            return error_response(exc)
        if down := await engine_down(self.host):
            return error_response(down)
        _log.error("request failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
        return error_response(RuntimeError(f"{type(exc).__name__}: {exc}"))


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    resp = JSONResponse(body, status_code=status)
    await send({"type": "http.response.start", "status": status,
                "headers": resp.raw_headers})
    await send({"type": "http.response.body", "body": resp.body})


def _field(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "body"


async def _this_process_metrics() -> bytes:
    return metrics.render()


def build_app(host: EngineHost, keys: ApiKeys | None = None, store: Store | None = None,
              settings: Settings | None = None,
              app_metrics: Callable[[], Awaitable[bytes]] = _this_process_metrics) -> FastAPI:
    """The server's app around an engine host (see the module docstring). ``app_metrics``:
    the app's own ``vinterp_*`` metrics for ``/metrics`` (default: this process's registry;
    replicas of the app gather every replica's)."""
    app = FastAPI(title="vinterp", description=DESCRIPTION, version=f"IR {IR_VERSION}")
    app.state.vinterp = Server(host=host, keys=keys or ApiKeys(), store=store or MemoryStore(),
                               settings=settings or Settings())
    for module in (openai_routes, traces, vectors, captures):
        app.include_router(module.router)

    @app.get("/health")
    async def health() -> Any:
        """Liveness, the served model and the IR version (no key needed); 503 once the
        engine cannot take requests, so a supervisor or load balancer sees it."""
        about = {"model": host.model_name, "ir_version": IR_VERSION}
        if down := await engine_down(host):
            return JSONResponse({"status": "unavailable", "error": str(down), **about},
                                status_code=503, headers={"Retry-After": str(down.retry_after)})
        return {"status": "ok", **about}

    @app.get("/metrics")
    async def prometheus() -> Response:
        """Prometheus metrics: vLLM's ``vllm:*`` and vinterp's ``vinterp_*`` (no key needed)."""
        body = await app_metrics() + await host.engine_metrics()
        return Response(body, media_type=metrics.CONTENT_TYPE)

    @app.get("/v1/stats", dependencies=[Depends(require_key)])
    async def stats() -> Any:
        """The plugin's counts of per-request state held in the engine's worker."""
        return await host.stats()

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
        field = _field(tuple(first.get("loc", ())))
        msg = str(first.get("msg", "invalid"))
        if first.get("type") == "json_invalid":
            field, msg = "body", f"the body is not valid JSON ({first.get('ctx', {})})"
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        return JSONResponse(error_body(f"{field}: {msg}{more}", 400, field), status_code=400)

    @app.exception_handler(EngineUnavailable)
    @app.exception_handler(StoreUnavailable)
    async def unavailable(request: Request, exc: Exception) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail), exc.status_code),
                            status_code=exc.status_code, headers=exc.headers)

    # (added first, so it runs inside BodyLimit: an answer after a 413 is dropped there)
    app.add_middleware(Unexpected, host=host)
    app.add_middleware(BodyLimit, limit=app.state.vinterp.settings.max_body_bytes)
    return app

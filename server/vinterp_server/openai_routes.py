"""``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions``: vLLM's OpenAI layer plus
vinterp's fields.

A request without vinterp fields goes through vLLM's serving code untouched, so its response
equals ``vllm serve``'s. One with fields is compiled and checked first (a bad field is a 400
that never reaches the engine); its captures are added to each choice (``captures``) when the
choice finishes, streamed or not. An intervention that fails at run time fails its own request
(500 with the reason); the other requests in the batch are untouched.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from vllm.entrypoints.serve.utils.api_utils import with_cancellation

from vinterp_server import metrics
from vinterp_server.auth import KeyInfo
from vinterp_server.captures import CaptureWriter
from vinterp_server.compile import CompiledRequest, FieldError, vector_names
from vinterp_server.context import Server, require_key, server
from vinterp_server.engine import RequestContext, engine_down
from vinterp_server.errors import EngineUnavailable, error_body, error_event, error_response
from vinterp_server.limits import LimitExceeded, Slot, TooLarge
from vinterp_server.schemas import (
    InterventionFields, VinterpChatCompletionRequest, VinterpCompletionRequest,
)
from vinterp_server.vectors import stored_vectors

router = APIRouter()


@router.get("/v1/models")
async def list_models(key: KeyInfo = Depends(require_key),
                      srv: Server = Depends(server)) -> Any:
    """The served model (OpenAI ``/v1/models``)."""
    return (await srv.host.models()).model_dump()


@router.post("/v1/completions", responses={200: {"content": {"text/event-stream": {}}}})
@with_cancellation
async def completions(request: VinterpCompletionRequest, raw_request: Request,
                      key: KeyInfo = Depends(require_key),
                      srv: Server = Depends(server)) -> Response:
    """OpenAI completions; ``interventions`` / ``capture`` / ``graph`` in the body."""
    return await _serve(request, raw_request, key, srv, srv.host.completions, "completions")


@router.post("/v1/chat/completions", responses={200: {"content": {"text/event-stream": {}}}})
@with_cancellation
async def chat_completions(request: VinterpChatCompletionRequest, raw_request: Request,
                           key: KeyInfo = Depends(require_key),
                           srv: Server = Depends(server)) -> Response:
    """OpenAI chat completions; ``interventions`` / ``capture`` / ``graph`` in the body."""
    return await _serve(request, raw_request, key, srv, srv.host.chat, "chat")


async def compile_fields(fields: InterventionFields, key: KeyInfo,
                         srv: Server) -> CompiledRequest:
    """Check and compile a request's vinterp fields (``FieldError`` / ``LimitExceeded``)."""
    found = await stored_vectors(srv, key, vector_names(fields))
    spec = CompiledRequest.build(fields, srv.host.model, vectors=found.get)
    srv.limiter.check_graph(key, spec.n_nodes)
    try:  # structure only: the prompt is not rendered yet
        srv.host.check(spec.graph_for([0]))
    except ValueError as exc:
        raise FieldError("graph" if fields.graph else "interventions", str(exc)) from None
    for op, n in spec.ops.items():
        metrics.INTERVENTIONS.labels(op=op).inc(n)
    return spec


async def _serve(request: Any, raw_request: Request, key: KeyInfo, srv: Server,
                 handler: Callable[[Any, Any], Awaitable[Any]], endpoint: str) -> Response:
    intervened = request.has_vinterp()
    metrics.REQUESTS.labels(endpoint=endpoint, intervened=str(intervened).lower()).inc()
    spec = None
    try:
        if intervened:
            if getattr(request, "use_beam_search", False):
                raise FieldError("use_beam_search", "beam search cannot be combined with "
                                                    "interventions or captures")
            spec = await compile_fields(request, key, srv)
        slot = await srv.limiter.acquire(key)
    except (FieldError, LimitExceeded) as exc:
        return error_response(exc)
    ctx = RequestContext(spec, capture_cap=key.limits.capture_bytes)
    request.attach(ctx)
    streaming = False
    try:
        try:
            result = await handler(request, raw_request)
        except Exception as exc:  # vLLM's own request errors (too long a prompt, ...)
            return await _error(srv, _as_error(exc), getattr(exc, "retry_after", None))
        if hasattr(result, "__aiter__"):
            streaming = True
            return await _stream(result, ctx, key, srv, slot)
        if hasattr(result, "error"):   # vLLM's ErrorResponse
            return await _error(srv, result)
        body = result.model_dump()
        if spec is not None:
            writer = CaptureWriter(srv, key)
            for choice in body["choices"]:
                outcome = ctx.outcome(choice["index"])
                if outcome is None or outcome.error:
                    return await _error(srv, _failed(outcome))
                try:
                    choice["captures"] = await writer.encode(spec, outcome.saves)
                except FieldError as exc:   # a graph save no response can carry
                    return error_response(exc)
        return JSONResponse(body)
    finally:
        if not streaming:
            await slot.release(ctx.tokens)


async def _error(srv: Server, err: Any, retry_after: int | None = None) -> Response:
    """``err`` as a response; a server-side failure while the engine is down is the engine's
    503 instead (vLLM would blame the request with a 500)."""
    response = error_response(err, retry_after)
    if response.status_code >= 500 and (down := await engine_down(srv.host)):
        return error_response(down)
    return response


def _as_error(exc: Exception) -> Any:
    """A handler's exception as vLLM's error response (its status rules), or a 500."""
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
    from vllm.exceptions import VLLMError

    if isinstance(exc, EngineUnavailable):   # (no replica could take it: 503)
        return exc
    if isinstance(exc, (VLLMError, ValueError, TypeError, OverflowError)):
        return create_error_response(exc)
    return RuntimeError(f"{type(exc).__name__}: {exc}")


def _failed(outcome: Any) -> Exception:
    reason = "the request finished without an outcome" if outcome is None else outcome.error
    if outcome is not None and outcome.too_large:   # the caller asked for too much: 413
        return TooLarge(f"intervention failed: {reason}")
    return RuntimeError(f"intervention failed: {reason}")


class _SlotStream(StreamingResponse):
    """An SSE response that gives back its request's slot however it ends: after the last
    chunk, when the client hangs up, or when the body never starts (an async generator that
    never began skips its own ``finally``, so the body cannot be the one to give it back)."""

    def __init__(self, events: AsyncIterator[str],
                 close: Callable[[], Awaitable[None]]) -> None:
        super().__init__(events, media_type="text/event-stream")
        self._close = close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._close()


async def _stream(gen: AsyncIterator[str], ctx: RequestContext, key: KeyInfo, srv: Server,
                  slot: Slot) -> Response:
    """A streamed response; an error before the first token is a real HTTP error status."""

    async def close() -> None:
        try:   # (a client that hangs up cancels every await here: close the stream anyway)
            await slot.release(ctx.tokens)
        finally:
            await gen.aclose()

    try:
        first = await gen.__anext__()
    except StopAsyncIteration:
        first = None
    except BaseException:
        await slot.release(ctx.tokens)
        raise
    early = error_event(first)
    if early is not None:
        await close()
        return await _error(srv, early)
    writer = CaptureWriter(srv, key) if ctx.spec is not None else None

    async def events() -> AsyncIterator[str]:
        try:
            if first is not None:
                yield await _with_captures(first, ctx, writer)
            async for chunk in gen:
                if chunk.startswith("data: [DONE]"):
                    # the slot back and the tokens charged before the client reads the end:
                    # the request it sends next must find them (close() comes after the
                    # last byte is sent, which the client does not wait for)
                    await slot.release(ctx.tokens)
                yield await _with_captures(chunk, ctx, writer)
        except Exception as exc:  # the body has begun: the status is sent, say it in an event
            # (an exception escaping here would drop the connection mid-body, which clients
            # report as a network error, with no reason)
            err = (error_body(str(exc), 400, exc.field) if isinstance(exc, FieldError)
                   else error_body(f"{type(exc).__name__}: {exc}", 500))
            yield f"data: {json.dumps(err)}\n\n"
            yield "data: [DONE]\n\n"

    return _SlotStream(events(), close)


async def _with_captures(chunk: str, ctx: RequestContext,
                         writer: CaptureWriter | None) -> str:
    """The SSE chunk with its captures: the steps each choice completed since the last chunk,
    and the rest in the chunk that finishes it."""
    if writer is None or not chunk.startswith("data: {"):
        return chunk
    data = json.loads(chunk[len("data: "):])
    spec = ctx.spec
    assert spec is not None
    changed = False
    errors: list[Exception] = []
    for choice in data.get("choices") or ():
        index = choice.get("index", 0)
        if choice.get("finish_reason") is None:
            parts = await ctx.take_steps(index)
            if parts:
                choice["captures"] = await writer.encode(spec, parts, fragment=True)
                changed = True
            continue
        outcome = ctx.outcome(index)
        if outcome is None or outcome.error:
            errors.append(_failed(outcome))
            continue
        choice["captures"] = await writer.encode(spec, outcome.saves)
        changed = True
    if errors:
        status = 413 if all(isinstance(e, TooLarge) for e in errors) else 500
        err = error_body("; ".join(map(str, errors)), status)
        return f"data: {json.dumps(err)}\n\n"
    return f"data: {json.dumps(data)}\n\n" if changed else chunk

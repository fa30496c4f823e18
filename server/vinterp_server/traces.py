"""``POST /v1/traces`` and ``GET /v1/traces/{id}``: remote traces (``remote=True``).

A trace is a whole graph (many invokes, ``trace`` or ``generate``) as the library compiles it.
It is validated by the one IR validator and checked against the engine before it runs; its
prompts join the same continuous batch as every OpenAI request. Results (saves, generated ids)
travel as JSON plus one safetensors blob (:mod:`vinterp.ir.results`): no pickle either way.
With ``blocking: false`` the answer is an id to poll; results are kept for ``trace_ttl``.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import JSONResponse, Response

from vinterp.ir import Graph, GraphError, load
from vinterp.ir.interpreter import InterventionError
from vinterp.ir.results import encode_results
from vinterp_server import metrics
from vinterp_server.auth import KeyInfo
from vinterp_server.compile import FieldError, resolve_named
from vinterp_server.context import Server, require_key, server
from vinterp_server.errors import error_response
from vinterp_server.limits import LimitExceeded
from vinterp_server.schemas import TraceRequest, TraceStatus

router = APIRouter()


def _check(graph: Graph, key: KeyInfo, srv: Server) -> None:
    srv.limiter.check_graph(key, len(graph.nodes))
    limit = srv.host.max_model_len
    for i, inv in enumerate(graph.invokes):
        for j, prompt in enumerate(inv.prompts):
            if not prompt:
                raise FieldError(f"graph.invokes[{i}].prompts[{j}]", "the prompt is empty")
            if len(prompt) >= limit:
                raise FieldError(f"graph.invokes[{i}].prompts[{j}]",
                                 f"the prompt has {len(prompt)} tokens; the model's context "
                                 f"is {limit} (max_model_len)")
    try:
        srv.host.check(graph)
    except ValueError as exc:
        raise FieldError("graph", str(exc)) from None


async def _run(graph: Graph, key: KeyInfo, srv: Server) -> dict[str, Any]:
    release = srv.limiter.acquire(key)
    try:
        result = await srv.host.run(graph, capture_cap=key.limits.capture_bytes)
    finally:
        release()
    tokens = sum(len(p) for inv in graph.invokes for p in inv.prompts)
    if result.generated is not None:
        tokens = sum(len(g) for g in result.generated)
    srv.limiter.record_tokens(key, tokens)
    return encode_results(result.saves, result.generated)


@router.post("/v1/traces", response_model=TraceStatus)
async def create_trace(body: TraceRequest, key: KeyInfo = Depends(require_key),
                       srv: Server = Depends(server)) -> Response:
    """Run a graph: blocking (the result in the answer) or not (an id to poll)."""
    try:
        graph = load(body.graph)
    except GraphError as exc:
        return error_response(FieldError("graph", str(exc)))
    try:
        graph = resolve_named(graph, lambda name: srv.store.get(key.id, "vector", name))
        _check(graph, key, srv)
    except (FieldError, LimitExceeded) as exc:
        return error_response(exc)
    tid = f"trace-{uuid.uuid4().hex}"
    if body.blocking:
        try:
            result = await _run(graph, key, srv)
        except (InterventionError, RuntimeError) as exc:
            metrics.TRACES.labels(status="failed").inc()
            return error_response(RuntimeError(f"intervention failed: {exc}"))
        except LimitExceeded as exc:
            return error_response(exc)
        metrics.TRACES.labels(status="done").inc()
        return JSONResponse(TraceStatus(id=tid, status="done", result=result).model_dump())
    ttl = srv.settings.trace_ttl
    srv.store.put(key.id, "trace", tid, TraceStatus(id=tid, status="queued"), ttl)

    async def background() -> None:
        srv.store.put(key.id, "trace", tid, TraceStatus(id=tid, status="running"), ttl)
        try:
            result = await _run(graph, key, srv)
            status = TraceStatus(id=tid, status="done", result=result)
        except Exception as exc:  # noqa: BLE001 - the poller reads why
            status = TraceStatus(id=tid, status="failed", error=f"{exc}")
        metrics.TRACES.labels(status=status.status).inc()
        srv.store.put(key.id, "trace", tid, status, ttl)

    task = asyncio.create_task(background())
    srv.tasks.add(task)
    task.add_done_callback(srv.tasks.discard)
    return JSONResponse(TraceStatus(id=tid, status="queued").model_dump(), status_code=202)


@router.get("/v1/traces/{trace_id}", response_model=TraceStatus)
async def get_trace(trace_id: str, key: KeyInfo = Depends(require_key),
                    srv: Server = Depends(server)) -> Any:
    """A trace's status, and its result once done."""
    status = srv.store.get(key.id, "trace", trace_id)
    if status is None:
        raise HTTPException(404, f"no trace {trace_id!r} for this key (results are kept "
                                 f"{int(srv.settings.trace_ttl)} s)")
    return status.model_dump()

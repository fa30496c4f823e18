"""``POST /v1/traces`` and ``GET /v1/traces/{id}``: remote traces (``remote=True``).

A trace is a whole graph (many invokes, ``trace`` or ``generate``) as the library compiles it.
It is validated by the one IR validator and checked against the engine before it runs; its
prompts join the same continuous batch as every OpenAI request. Results (saves, generated ids)
travel as JSON plus one safetensors blob (:mod:`vinterp.ir.results`): no pickle either way.
With ``blocking: false`` the answer is an id to poll; results are kept for ``trace_ttl``.

A request is admitted once (one of the key's concurrent slots, one token-budget check) before
anything runs or a ``202`` is sent, so a trace over a limit gets its 429 either way; the tokens
of all its graphs are charged when it ends (a graph that fails is charged its prompts: the
engine read them). A background trace's status is refreshed every ``HEARTBEAT_S`` while it
runs: a status left ``running`` by a server that stopped (or an ingress replica that was
replaced) reads as failed once it is ``STALE_S`` old, so a poller is told to send it again
instead of waiting out the TTL.

A session (``session: [graph, ...]``, ``model.session(remote=True)``) is one request: its
graphs are all validated and checked first, then run in order, each one's
:class:`~vinterp.ir.SessionValue` tensors filled in from the saves of the earlier graphs it
names; the result is ``{"traces": [result, ...]}``, one per graph.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
import uuid
from typing import Any

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import JSONResponse, Response

import torch
from vllm.exceptions import VLLMClientError

from vinterp.backends.base import RunResult
from vinterp.backends.vllm.runs import saved_bytes
from vinterp.backends.vllm.sampling import sampling_params
from vinterp.ir import Graph, GraphError, SessionValue, encode_tensor, load
from vinterp.ir.errors import CaptureLimitError, InterventionError
from vinterp.ir.results import encode_results
from vinterp_server import metrics
from vinterp_server.auth import KeyInfo
from vinterp_server.compile import FieldError, resolve_named, vector_names
from vinterp_server.context import Server, require_key, server
from vinterp_server.errors import error_response, status_for
from vinterp_server.limits import LimitExceeded, Slot, TooLarge
from vinterp_server.schemas import TraceRequest, TraceStatus
from vinterp_server.vectors import stored_vectors

router = APIRouter()
log = logging.getLogger("vinterp.server")

#: seconds between refreshes of a background trace's status, and the age past which a status
#: still ``queued``/``running`` belongs to a server that stopped
HEARTBEAT_S = 10.0
STALE_S = 45.0


def _check(graph: Graph, key: KeyInfo, srv: Server, name: str = "graph") -> None:
    """Refuse (``FieldError`` naming the field) what the engine would refuse at run time:
    before any of the trace's requests starts, so none is left running for a sibling's
    error, and the answer is a 400 that says which field, not a 500."""
    srv.limiter.check_graph(key, len(graph.nodes))
    limit = srv.host.max_model_len
    vocab = srv.host.model.vocab_size
    for i, inv in enumerate(graph.invokes):
        _check_generation(graph, i, name)
        for j, prompt in enumerate(inv.prompts):
            if not prompt:
                raise FieldError(f"{name}.invokes[{i}].prompts[{j}]", "the prompt is empty")
            if len(prompt) >= limit:
                raise FieldError(f"{name}.invokes[{i}].prompts[{j}]",
                                 f"the prompt has {len(prompt)} tokens; the model's context "
                                 f"is {limit} (max_model_len)")
            bad = next((t for t in prompt if t < 0 or (vocab and t >= vocab)), None)
            if bad is not None:
                raise FieldError(f"{name}.invokes[{i}].prompts[{j}]",
                                 f"token id {bad} is outside the model's vocabulary "
                                 f"(0 to {vocab - 1})")
    try:
        srv.host.check(graph)
    except ValueError as exc:
        raise FieldError(name, str(exc)) from None


#: what building ``SamplingParams`` raises for arguments it refuses (vLLM's own checks raise
#: its ``VLLMValidationError``, not a ``ValueError``)
_REFUSED = (ValueError, TypeError, VLLMClientError)


def _check_generation(graph: Graph, i: int, name: str) -> None:
    """Invoke ``i``'s generation arguments (the graph's, overridden by the invoke's) as the
    engine will build them (:func:`sampling_params`, once per invoke); a ``FieldError``
    naming the argument at fault: ``graph.generation.foo`` or
    ``graph.invokes[i].generation.foo``."""
    if graph.mode != "generate":
        return   # (a trace is one greedy forward: its generation arguments are not used)
    own = graph.invokes[i].generation
    merged = {**graph.generation, **own}
    try:
        sampling_params(merged, mode=graph.mode)
    except _REFUSED as exc:
        message = str(exc)
    else:
        return
    # the first argument that is wrong on its own; else the invoke's arguments together
    for arg, value in merged.items():
        try:
            sampling_params({arg: value}, mode=graph.mode)
        except _REFUSED:
            where = f"invokes[{i}].generation" if arg in own else "generation"
            raise FieldError(f"{name}.{where}.{arg}", message) from None
    raise FieldError(f"{name}.invokes[{i}].generation", message)


def _check_session_refs(graph: Graph, earlier: list[Graph], name: str,
                        in_session: bool) -> None:
    """Each :class:`SessionValue` of ``graph`` must name a save node of an earlier graph of
    the same session request."""
    for i, td in enumerate(graph.tensors):
        if not isinstance(td, SessionValue):
            continue
        where = f"{name}.tensors[{i}]"
        if not in_session:
            raise FieldError(where, "a session value (a saved value of another trace) needs "
                                    "a session request: send the traces together as "
                                    "'session': [graph, ...]")
        if td.trace >= len(earlier):
            raise FieldError(where, f"it names trace {td.trace} of the session, which does "
                                    f"not run before this one ({len(earlier)} do)")
        nodes = earlier[td.trace].nodes
        if td.node >= len(nodes) or nodes[td.node].op != "save":
            raise FieldError(where, f"node {td.node} of the session's trace {td.trace} is not "
                                    f"a save; only saved values cross traces")


async def _load_all(body: TraceRequest, key: KeyInfo, srv: Server) -> list[Graph]:
    """The request's graph(s): validated, named vectors resolved, checked against the engine
    (all of a session's before any runs)."""
    single = body.graph is not None
    texts = [body.graph] if single else list(body.session or ())
    graphs: list[Graph] = []
    for j, text in enumerate(texts):
        name = "graph" if single else f"session[{j}]"
        try:
            graph = load(text)
        except GraphError as exc:
            raise FieldError(name, str(exc)) from None
        found = await stored_vectors(srv, key, vector_names(graph))
        graph = resolve_named(graph, found.get, name)
        _check_session_refs(graph, graphs, name, not single)
        _check(graph, key, srv, name)
        graphs.append(graph)
    return graphs


def _fill_session(graph: Graph, results: list[RunResult], j: int) -> Graph:
    """``graph`` with its session values replaced by the earlier graphs' saved tensors."""
    if not any(isinstance(t, SessionValue) for t in graph.tensors):
        return graph
    tensors = []
    for i, td in enumerate(graph.tensors):
        if not isinstance(td, SessionValue):
            tensors.append(td)
            continue
        where = f"session[{j}].tensors[{i}]"
        value = results[td.trace].saves.get(td.node)
        if value is None:
            raise RuntimeError(f"{where}: trace {td.trace} of the session returned no value "
                               f"for node {td.node} (it stopped, or its step never ran)")
        if not isinstance(value, torch.Tensor):
            raise RuntimeError(f"{where}: the value of trace {td.trace}'s node {td.node} is a "
                               f"{type(value).__name__}, not a tensor (a value saved at every "
                               f"step is a list); save one tensor to use it in a later trace")
        if td.shape and tuple(value.shape) != tuple(td.shape):
            raise RuntimeError(f"{where}: trace {td.trace}'s node {td.node} has shape "
                               f"{list(value.shape)}, the trace expected {list(td.shape)}")
        tensors.append(encode_tensor(value.detach().cpu().contiguous()))
    return graph.model_copy(update={"tensors": tuple(tensors)})


async def _run(graphs: list[Graph], key: KeyInfo, srv: Server, slot: Slot,
               session: bool = False) -> dict[str, Any]:
    """Run the request's graph(s) in order on its one slot; release it, charging every
    graph's tokens (prompts, or prompts and generated ids), however it ends."""
    tokens = 0
    results: list[RunResult] = []
    cap = key.limits.capture_bytes
    try:
        for j, graph in enumerate(graphs):
            graph = _fill_session(graph, results, j)
            prompts = sum(len(p) for inv in graph.invokes for p in inv.prompts)
            # the key's capture_bytes is the whole request's: a session's graph may capture
            # what the earlier ones left (each run holds all its prompts to what it is given)
            left = cap - sum(saved_bytes(r.saves) for r in results)
            try:
                results.append(await srv.host.run(graph, capture_cap=max(0, left)))
            except CaptureLimitError as exc:
                tokens += prompts
                if not results:
                    raise
                raise CaptureLimitError(f"{exc} (session[{j}] could capture the {left} bytes "
                                        f"of the key's {cap} the earlier traces left)") from None
            except Exception:
                tokens += prompts   # it failed after the engine read its prompts: they count
                raise
            tokens += (sum(len(g) for g in results[-1].generated)
                       if results[-1].generated is not None else prompts)
    except Exception:
        await srv.host.check_health()   # the engine died: its 503, not the trace's failure
        raise
    finally:
        await slot.release(tokens)
    if not session:
        return encode_results(results[0].saves, results[0].generated)
    return {"traces": [encode_results(r.saves, r.generated) for r in results]}


def _failure(exc: Exception) -> Exception:
    """What a trace that raised ``exc`` answers: an intervention that failed says so (413 if
    it captured more than its key may), other errors (limits, a dead engine) are their own."""
    if isinstance(exc, CaptureLimitError):
        return TooLarge(f"intervention failed: {exc}")
    if isinstance(exc, (InterventionError, RuntimeError)):
        return RuntimeError(f"intervention failed: {exc}")
    return exc


@router.post("/v1/traces", response_model=TraceStatus)
async def create_trace(body: TraceRequest, key: KeyInfo = Depends(require_key),
                       srv: Server = Depends(server)) -> Response:
    """Run a graph: blocking (the result in the answer) or not (an id to poll)."""
    session = body.session is not None
    try:
        graphs = await _load_all(body, key, srv)
        slot = await srv.limiter.acquire(key)
    except (FieldError, LimitExceeded) as exc:
        return error_response(exc)
    tid = f"trace-{uuid.uuid4().hex}"
    if body.blocking:
        try:
            result = await _run(graphs, key, srv, slot, session)
        except (InterventionError, RuntimeError, LimitExceeded, ValueError,
                VLLMClientError) as exc:
            # (ValueError, VLLMClientError: what the engine refused at run time, a check
            # _check does not repeat: the request's fault, a 400)
            metrics.TRACES.labels(status="failed").inc()
            return error_response(_failure(exc))
        metrics.TRACES.labels(status="done").inc()
        return JSONResponse(TraceStatus(id=tid, status="done", result=result).model_dump())
    ttl = srv.settings.trace_ttl

    async def put(status: TraceStatus) -> None:
        await srv.store.put(key.id, "trace", tid, status, ttl)

    queued = TraceStatus(id=tid, status="queued", updated=time.time())
    try:
        await put(queued)
    except BaseException:
        await slot.release()   # (the trace never started: its slot back, nothing charged)
        raise

    async def heartbeat() -> None:
        while True:
            try:
                await put(TraceStatus(id=tid, status="running", updated=time.time()))
            except Exception:   # a store hiccup: the next beat (or the final status) tries again
                log.warning("could not refresh the status of %s", tid, exc_info=True)
            await asyncio.sleep(HEARTBEAT_S)

    async def background() -> None:
        beat = asyncio.create_task(heartbeat())
        stopped: BaseException | None = None
        try:
            result = await _run(graphs, key, srv, slot, session)
            status = TraceStatus(id=tid, status="done", result=result)
        except asyncio.CancelledError as exc:   # the server is stopping (finish_background)
            stopped = exc
            status = TraceStatus(id=tid, status="failed", code=503, error=(
                "the server stopped before the trace finished; send it again"))
        except Exception as exc:  # noqa: BLE001 - the poller reads why
            failure = _failure(exc)
            status = TraceStatus(id=tid, status="failed", error=f"{failure}",
                                 code=status_for(failure))
        beat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beat   # (its last put lands before the final status)
        metrics.TRACES.labels(status=status.status).inc()
        await put(status)
        if stopped is not None:
            raise stopped

    # (a context of its own, not the request's: on Ray Serve a request cancelled around its
    # 202 would take the calls made in its context with it, the trace's among them)
    task = asyncio.get_running_loop().create_task(background(), context=contextvars.Context())
    srv.tasks.add(task)
    task.add_done_callback(srv.tasks.discard)
    return JSONResponse(queued.model_dump(), status_code=202)


async def finish_background(srv: Server, timeout: float) -> None:
    """At shutdown: let background traces finish for up to ``timeout`` seconds, then stop the
    rest, which record that they failed because the server stopped (their pollers are told to
    send them again) before the engine goes away."""
    pending = set(srv.tasks)
    if pending:
        _, pending = await asyncio.wait(pending, timeout=timeout)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=10)


@router.get("/v1/traces/{trace_id}", response_model=TraceStatus)
async def get_trace(trace_id: str, key: KeyInfo = Depends(require_key),
                    srv: Server = Depends(server)) -> Any:
    """A trace's status, and its result once done."""
    status = await srv.store.get(key.id, "trace", trace_id)
    if status is None:
        raise HTTPException(404, f"no trace {trace_id!r} for this key (results are kept "
                                 f"{int(srv.settings.trace_ttl)} s)")
    if status.status in ("queued", "running") and (
            status.updated is not None and time.time() - status.updated > STALE_S):
        status = TraceStatus(id=trace_id, status="failed", code=503, error=(
            f"the server running this trace stopped before it finished (no news of it for "
            f"{int(time.time() - status.updated)} s); send it again"))
    return status.model_dump()

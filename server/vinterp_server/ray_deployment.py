"""Ray Serve: the same app as an ingress in front of N engine replicas.

``vinterp serve --replicas N`` (or ``--ray``) runs :func:`vinterp_server.app.build_app`, the
app of the one-process server, in an ingress deployment. Its engine host is a
:class:`RayEngineHost`: every OpenAI request, remote trace and stats call goes over a Ray
Serve handle to an :class:`EngineReplica`, each of which holds a whole
:class:`~vinterp_server.engine.LocalEngineHost` (an ``AsyncLLM`` engine with the plugin).
Ray Serve spreads requests over the replicas, restarts one whose engine died (its health
check asks the engine), and serves HTTP through its proxy.

What crosses between them is data: the request model without its context, the compiled
interventions (:class:`~vinterp_server.compile.CompiledRequest`), and back, per SSE chunk, a
:class:`Piece` with the chunk, the step captures and finished prompts' outcomes. The
ingress feeds them into the request's own :class:`~vinterp_server.engine.RequestContext`,
so routes, captures, keys and limits run exactly as in one process: per-key state stays in
the ingress's :class:`~vinterp_server.store.Store`.

Example::

    app = build_ray_app("smollm2-135m", ["--max-model-len", "2048"], replicas=2,
                        keys=ApiKeys.load("keys.txt"))
    serve.run(app, name="vinterp", route_prefix="/")
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ray import serve

from vinterp.backends.base import RunResult
from vinterp.ir.schema import Graph
from vinterp_server.auth import ApiKeys
from vinterp_server.compile import CompiledRequest
from vinterp_server.context import Settings
from vinterp_server.engine import LocalEngineHost, RequestContext, engine_down, http_error
from vinterp_server.errors import EngineUnavailable, error_event, sse_json
from vinterp_server.metrics import RETRIES, families, merge_replicas

T = TypeVar("T")
logger = logging.getLogger(__name__)

#: requests one replica (or the ingress) takes at once: Ray Serve's default of 5 would
#: starve the engine's continuous batch, which is where the speed is
MAX_ONGOING = 1024


@dataclass
class RemoteCall:
    """One OpenAI request, sent from the ingress to an engine replica."""

    endpoint: str                     # "completions" or "chat"
    request: Any                      # the request model, without its context
    spec: CompiledRequest | None      # its compiled interventions (None: plain)
    capture_cap: int


@dataclass
class Piece:
    """What a replica sends back: one SSE chunk (``""``: none, only news), or the whole
    response, or an error; with the request context's news since the last piece."""

    chunk: str | None = None
    result: Any = None                # a whole (non-streamed) response or ErrorResponse
    error: BaseException | None = None
    steps: dict[int, dict[int, list[tuple[int, Any]]]] = field(default_factory=dict)
    outcomes: dict[int, Any] = field(default_factory=dict)
    tokens: int = 0                   # prompt + generated tokens since the previous piece


class EngineReplica:
    """One engine (a :class:`LocalEngineHost`) as a Ray Serve replica."""

    async def __init__(self, model: str, vllm_argv: list[str]) -> None:
        self.host = await LocalEngineHost.start(model, vllm_argv)
        self.requests = 0

    def info(self) -> dict[str, Any]:
        """What the ingress needs to compile and check requests without a round trip."""
        engine = self.host.engine
        return {"model_name": self.host.model_name, "model": self.host.model,
                "max_model_len": self.host.max_model_len,
                "check": engine.check_args}

    async def models(self) -> Any:
        return await self.host.models()

    async def serve(self, call: RemoteCall) -> AsyncIterator[Piece]:
        """Run one OpenAI request here; one :class:`Piece` per chunk (one in all if not
        streamed)."""
        self.requests += 1
        ctx = RequestContext(call.spec, capture_cap=call.capture_cap)
        call.request.attach(ctx)
        handler = self.host.completions if call.endpoint == "completions" else self.host.chat
        sent = _Sent()
        try:
            result = await handler(call.request, None)
        except Exception as exc:   # vLLM's request errors and ours (400, 429, ...)
            yield Piece(error=await engine_down(self.host) or _portable(exc))
            return
        if not hasattr(result, "__aiter__"):
            down = await engine_down(self.host) if hasattr(result, "error") else None
            yield Piece(error=down) if down else _news(ctx, sent, Piece(result=result))
            return
        try:
            first = True
            async for chunk in result:
                # an error before any output: if the engine died, another replica retries it
                if first and error_event(chunk) and (down := await engine_down(self.host)):
                    yield Piece(error=down)
                    return
                first = False
                steps = {}
                # the completed steps of the choices this chunk continues (streamed captures),
                # as one process takes them: steps taken for a choice that gets no chunk
                # before its last (vLLM sends none where a tool or reasoning parser holds
                # text back) would be missing from its final captures
                for index in _running_choices(chunk):
                    if index in ctx.keys and index not in ctx.outcomes:
                        parts = await ctx.take_steps(index)
                        if parts:
                            steps[index] = parts
                yield _news(ctx, sent, Piece(chunk=chunk, steps=steps))
            if sent.tokens < ctx.tokens or len(sent.outcomes) < len(ctx.outcomes):
                yield _news(ctx, sent, Piece(chunk=""))   # news after the last chunk
        finally:
            await result.aclose()

    async def run(self, graph: Graph, capture_cap: int | None) -> RunResult:
        self.requests += 1
        try:
            return await self.host.run(graph, capture_cap=capture_cap)
        except Exception:
            await self.host.check_health()   # (EngineUnavailable: the ingress retries)
            raise

    async def stats(self) -> dict[str, Any]:
        """The engine's counts, the requests this replica took, its Ray Serve id and its
        process id."""
        return {**await self.host.stats(), "requests": self.requests,
                "replica_id": _replica_id(), "pid": os.getpid()}

    def metrics(self) -> tuple[str, bytes]:
        """This replica's id and its ``vllm:*`` metrics."""
        return _replica_id(), families("vllm:")

    async def check_health(self) -> None:
        """Ray Serve's health check (every 2 s: it only reads the engine's error flag): a
        replica whose engine died stops getting requests and is replaced."""
        await self.host.check_health()

    async def __del__(self) -> None:
        await self.host.shutdown()


@dataclass
class _Sent:
    """What a replica has already sent the ingress for one request."""

    outcomes: set[int] = field(default_factory=set)
    tokens: int = 0


def _running_choices(chunk: str) -> list[int]:
    """The indices of the choices an SSE chunk continues (not those it finishes)."""
    data = sse_json(chunk) or {}
    return [c.get("index", 0) for c in data.get("choices") or ()
            if c.get("finish_reason") is None]


def _news(ctx: RequestContext, sent: _Sent, piece: Piece) -> Piece:
    piece.outcomes = {i: o for i, o in ctx.outcomes.items() if i not in sent.outcomes}
    sent.outcomes.update(piece.outcomes)
    piece.tokens, sent.tokens = ctx.tokens - sent.tokens, ctx.tokens
    return piece


def _portable(exc: Exception) -> BaseException:
    """``exc`` as something that survives pickling with its meaning (HTTP status included)."""
    from vllm.exceptions import GracefulHTTPError

    if isinstance(exc, GracefulHTTPError):   # its __init__ takes two arguments: rebuilt there
        return _Graceful(exc.message, int(exc.http_status),
                         getattr(exc, "retry_after", None))
    try:
        return pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


@dataclass
class _Graceful(Exception):
    message: str
    status: int
    retry_after: float | None

    def __str__(self) -> str:
        return self.message

    def rebuild(self) -> Exception:
        return http_error(self, self.status)


class RayEngineHost:
    """The :class:`~vinterp_server.engine.EngineHost` the ingress's app talks to: each call
    goes to an :class:`EngineReplica` over a Ray Serve handle."""

    def __init__(self, handle: Any, info: dict[str, Any]) -> None:
        self._handle = handle
        self.model_name: str = info["model_name"]
        self.model = info["model"]
        self.max_model_len: int = info["max_model_len"]
        self._check_args = info["check"]
        self._health = (0.0, True)   # (when asked, any replica alive)

    @classmethod
    async def connect(cls, handle: Any) -> RayEngineHost:
        """The host for the engine deployment behind ``handle`` (waits for a replica)."""
        return cls(handle, await handle.info.remote())

    async def completions(self, request: Any, raw_request: Any) -> Any:
        return await self._call("completions", request)

    async def chat(self, request: Any, raw_request: Any) -> Any:
        return await self._call("chat", request)

    async def _call(self, endpoint: str, request: Any) -> Any:
        ctx: RequestContext | None = request.attached()
        call = RemoteCall(endpoint, request.detached(), None if ctx is None else ctx.spec,
                          0 if ctx is None else ctx.capture_cap)

        async def attempt() -> tuple[Any, Piece]:
            pieces = self._handle.options(stream=True).serve.remote(call)
            try:
                return pieces, _take(ctx, await pieces.__anext__())
            except BaseException:   # (a client gone while waiting: stop it there too)
                pieces.cancel()
                raise

        pieces, first = await _on_a_live_replica(attempt)
        if first.chunk is None:
            return first.result
        return _chunks(first.chunk, pieces, ctx)

    async def models(self) -> Any:
        return await self._handle.models.remote()

    def check(self, graph: Graph) -> None:
        from vinterp.backends.vllm.backend import check_graph

        check_graph(graph, *self._check_args)

    async def run(self, graph: Graph, *, capture_cap: int | None = None) -> RunResult:
        from ray.exceptions import RayTaskError

        try:
            return await _on_a_live_replica(
                lambda: self._handle.run.remote(graph, capture_cap))
        except RayTaskError as exc:   # the replica's own error, without Ray's traceback
            logger.info("a remote trace failed on its replica: %s", exc)
            raise (exc.cause if isinstance(exc.cause, Exception) else exc) from None

    async def check_health(self) -> None:
        """Unavailable only when no replica's engine is alive (Ray Serve replaces dead ones;
        requests meanwhile go to the others). The answer is kept for a second: failed
        requests ask too, and each asking is a call to every replica."""
        now = time.monotonic()
        if now - self._health[0] > 1.0:
            self._health = (now, await self._any_replica_alive())
        if not self._health[1]:
            raise EngineUnavailable("no engine replica is alive; Ray Serve is starting new "
                                    "ones", retry_after=30)

    async def _any_replica_alive(self) -> bool:
        return any(r is None for r in await _ask_every_replica(self._handle, "check_health",
                                                               timeout_s=10))

    async def stats(self) -> dict[str, Any]:
        """The replicas' counts summed, their shared settings, and each replica's own
        (``per_replica``)."""
        # a replica whose engine died answers with its error until Ray Serve replaces it;
        # none answering (all being replaced) reads as no replicas, not as a 500
        each = await _ask_every_replica(self._handle, "stats", timeout_s=60)
        each = [{"error": f"{type(s).__name__}: {s}"} if isinstance(s, BaseException) else s
                for s in each]
        total: dict[str, Any] = {}
        for stats in each:
            for name, value in stats.items():
                if name in ("replica_id", "pid", "error"):
                    continue
                if name in _COUNTS:
                    total[name] = total.get(name, 0) + value
                elif total.setdefault(name, value) != value:
                    total[name] = "differs"   # see per_replica
        return {**total, "replicas": len(each), "failing": sum("error" in s for s in each),
                "per_replica": each}

    async def engine_metrics(self) -> bytes:
        """The replicas' ``vllm:*`` metrics, each sample labelled with its ``replica`` id."""
        return await _gather_metrics(self._handle, "replica")

    async def shutdown(self) -> None:
        """Nothing: Ray Serve owns the replicas."""


#: the stats that add up over replicas (the rest are settings, the same on each)
_COUNTS = frozenset({"states", "tracked_ids", "evicted", "parsed_graphs", "point_calls",
                     "eager_steps", "table_steps", "kv_clears", "requests"})


#: how long the ingress retries a request whose replica is gone or whose engine died before
#: any of its output was sent: Ray Serve's health check (every 2 s) then stops routing to
#: that replica, and a lone replica's replacement starts (an engine start, ~30 s on CPU)
RETRY_WINDOW_S = 90.0


async def _on_a_live_replica(attempt: Callable[[], Awaitable[T]]) -> T:
    """``attempt()`` (one call to some replica), again while replicas answer that their
    engine died (:class:`EngineUnavailable`) or are gone (``RayActorError``), with backoff,
    for up to :data:`RETRY_WINDOW_S`; then the 503."""
    from ray.exceptions import RayActorError

    deadline = None
    delay = 0.1
    while True:
        try:
            return await attempt()
        except (EngineUnavailable, RayActorError) as exc:
            # (counted from the first failure: an attempt may run long before it fails)
            deadline = deadline or time.monotonic() + RETRY_WINDOW_S
            if time.monotonic() + delay > deadline:
                raise EngineUnavailable(f"no engine replica could take the request in "
                                        f"{RETRY_WINDOW_S:.0f} s (last: {type(exc).__name__})",
                                        retry_after=30) from None
            RETRIES.inc()
        await asyncio.sleep(delay)
        delay = min(2 * delay, 2.0)


def _replica_id() -> str:
    """This Ray Serve replica's id (stable for its life: a label for its metrics)."""
    return serve.get_replica_context().replica_id.unique_id


async def _ask_every_replica(handle: Any, method: str, timeout_s: float) -> list[Any]:
    """Each replica's answer to ``method`` (its exception if it failed); ``[]`` when there
    is no replica to ask or not all answered in time (Ray's broadcast has one deadline for
    all of them: a scrape then lacks this side's samples, and the next one has them)."""
    try:
        return await handle.broadcast(method).results_async(timeout_s=timeout_s,
                                                            return_exceptions=True)
    except Exception:
        return []


async def _gather_metrics(handle: Any, label: str) -> bytes:
    """Every replica's ``metrics()`` behind ``handle``, merged, each sample labelled with
    its replica's id (a replica that fails is left out; see :func:`_ask_every_replica` for
    one that is slow)."""
    # (5 s: well within a Prometheus scrape's default 10 s)
    each = await _ask_every_replica(handle, "metrics", timeout_s=5)
    return merge_replicas(dict(m for m in each if isinstance(m, tuple)), label)


def _take(ctx: RequestContext | None, piece: Piece) -> Piece:
    if piece.error is not None:
        raise piece.error.rebuild() if isinstance(piece.error, _Graceful) else piece.error
    if ctx is not None:
        ctx.receive(piece.steps, piece.outcomes, piece.tokens)
    return piece


async def _chunks(first: str, pieces: Any, ctx: RequestContext | None) -> AsyncIterator[str]:
    done = False
    try:
        if first:
            yield first
        async for piece in pieces:
            chunk = _take(ctx, piece).chunk
            if chunk:   # ("": news only)
                yield chunk
        done = True
    finally:
        if not done:   # the client went away: stop the request on its replica
            pieces.cancel()


@serve.ingress()
class Ingress:
    """The app of ``vinterp serve`` as Ray Serve's HTTP ingress."""

    async def __init__(self, engine: Any, keys: ApiKeys, settings: Settings,
                       store_actors: list[str] | None) -> None:
        self._host = await RayEngineHost.connect(engine)
        self._keys = keys
        self._settings = settings
        self._store_actors = store_actors

    def metrics(self) -> tuple[str, bytes]:
        """This ingress replica's id and its ``vinterp_*`` metrics."""
        return _replica_id(), families("vinterp_")

    async def _all_ingress_metrics(self) -> bytes:
        # a scrape through Ray's proxy reaches one ingress: it answers for all of them, so
        # the counters do not jump between scrapes
        ctx = serve.get_replica_context()
        me = serve.get_deployment_handle(ctx.deployment, ctx.app_name)
        return await _gather_metrics(me, "ingress")

    def __serve_build_asgi_app__(self) -> Any:
        from vinterp_server.app import build_app
        from vinterp_server.ray_store import shared_store
        from vinterp_server.store import MemoryStore

        # one ingress keeps per-key state in its memory; several share the store's actors
        store = MemoryStore() if not self._store_actors else shared_store(self._store_actors)
        self._app = build_app(self._host, self._keys, store, self._settings,
                              app_metrics=self._all_ingress_metrics)
        return self._app

    async def __del__(self) -> None:
        # Serve stops a replica (scale-down, shutdown): its background traces finish or say
        # they were stopped, as in one process
        from vinterp_server.traces import finish_background

        app = getattr(self, "_app", None)
        if app is not None:   # (10 s of Serve's grace left to record what was stopped)
            await finish_background(app.state.vinterp,
                                    timeout=max(1.0, self._settings.shutdown_timeout - 10))


def build_ray_app(model: str, vllm_argv: list[str], *, replicas: int = 1,
                  keys: ApiKeys | None = None, settings: Settings | None = None,
                  replica_actor_options: dict[str, Any] | None = None,
                  ingress_replicas: int = 1, store_actors: list[str] | None = None) -> Any:
    """The Ray Serve application: the ingress (``ingress_replicas`` of it, sharing the store
    actors named ``store_actors``, see :mod:`vinterp_server.ray_store`) bound to ``replicas``
    engine replicas."""
    if ingress_replicas > 1 and not store_actors:
        raise ValueError("several ingress replicas need a shared store: pass store_actors "
                         "(vinterp_server.ray_store.start_store_actors)")
    settings = settings or Settings()
    engine = serve.deployment(EngineReplica, name="engine").options(
        num_replicas=replicas, max_ongoing_requests=MAX_ONGOING,
        ray_actor_options=replica_actor_options or {"num_cpus": 0},
        health_check_period_s=2, health_check_timeout_s=60,
        graceful_shutdown_timeout_s=settings.shutdown_timeout)
    ingress = serve.deployment(Ingress, name="ingress").options(
        num_replicas=ingress_replicas, max_ongoing_requests=MAX_ONGOING,
        ray_actor_options={"num_cpus": 0},
        graceful_shutdown_timeout_s=settings.shutdown_timeout)
    return ingress.bind(engine.bind(model, list(vllm_argv)), keys or ApiKeys(), settings,
                        store_actors)

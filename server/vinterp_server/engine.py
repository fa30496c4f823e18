"""Hosting the engine: one ``AsyncLLM`` with vinterp's plugin, behind vLLM's OpenAI layer.

The app (:mod:`vinterp_server.app`) talks to an :class:`EngineHost`; how the engine is hosted
is this module's business. :class:`LocalEngineHost` is the embedded default (engine in this
process's event loop, engine core in a child process). A Ray Serve replica hosts the same
class; the ingress then forwards to replicas.

vLLM's own serving classes do chat templates, sampling parameters, stop strings, logprobs
and SSE framing. They call ``engine_client.generate``; :class:`InterventionClient` is that
client: it finds the request's :class:`RequestContext` in ``SamplingParams.extra_args``
(put there by the request models' ``to_sampling_params``), compiles the IR graph for the
rendered prompt tokens, attaches the payload, and collects the outcome when the request ends.

Example::

    host = await LocalEngineHost.start("smollm2-135m", ["--max-model-len", "2048"])
    response = await host.completions(request, raw_request)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import uuid
from collections.abc import AsyncIterator
from typing import Any, Protocol

from vinterp.backends.base import RunResult
from vinterp.backends.vllm import requests as rq
from vinterp.backends.vllm.async_engine import AsyncEngine, generated_so_far
from vinterp.backends.vllm.runs import over_cap_error, saved_bytes
from vinterp.ir.schema import Graph
from vinterp.models.registry import resolve_model
from vinterp_server.compile import CompiledRequest, FieldError, ModelInfo
from vinterp_server.errors import EngineUnavailable, FieldRefused
from vinterp_server.limits import Limiter, TooLarge
from vinterp_server.schemas import CONTEXT_KEY, CURRENT_CONTEXT
from vinterp_vllm.payload import EXTRA_ARGS_KEY, Outcome, Payload

class RequestContext:
    """One HTTP request's interventions, limits and outcomes (one per rendered prompt).

    ``spec`` is ``None`` for a plain request: only its tokens are counted.

    ``capture_cap`` (a key's ``capture_bytes``) holds for the whole HTTP request, however many
    prompts and samples (engine requests) it has: up front, the captures' estimates of all
    its prompts add up (413 before the engine runs); at run time, the bytes each engine
    request hands back (streamed steps, final outcomes) add up as they arrive, and once past
    the cap the request's remaining outcomes fail (413). Each payload also carries the whole
    cap, so the worker stops one engine request that alone passes it.
    """

    def __init__(self, spec: CompiledRequest | None, *, capture_cap: int) -> None:
        self.spec = spec
        self.capture_cap = capture_cap
        #: prompt + generated tokens so far (the key's budget counts them when the request
        #: gives its slot back)
        self.tokens = 0
        #: the prompts of engine requests vLLM made on its own that were counted (see
        #: :meth:`counted`)
        self._own_prompts: list[tuple[int, ...]] = []
        self.outcomes: dict[int, Outcome] = {}
        self.keys: dict[int, str] = {}
        #: generated tokens each rendered prompt's output has shown so far
        self.generated: dict[int, int] = {}
        self._engine: AsyncEngine | None = None
        self._prompts = 0
        #: the capture estimates of the prompts checked so far, and the bytes captured so far
        #: (both held against ``capture_cap``: it is the whole request's)
        self._estimated = 0
        self.captured = 0
        #: why the request failed once its captures passed the cap (None: not passed)
        self._over_cap: str | None = None
        #: step captures computed where the engine runs, not yet taken (a remote host)
        self._received: dict[int, dict[int, list[tuple[int, Any]]]] = {}

    async def generate(self, engine: AsyncEngine, prompt: Any, params: Any, request_id: str,
                       **kwargs: Any) -> AsyncIterator[Any]:
        """The engine's outputs for one rendered prompt, with this request's payload.

        With ``n > 1`` and interventions, each of the ``n`` samples is an engine request of
        its own (:meth:`_samples`): the worker keeps state per request, and vLLM's parallel
        sampling would give all its child requests one payload.
        """
        prompt_index = self._prompts
        self._prompts += 1
        n = int(getattr(params, "n", 1) or 1)
        if self.spec is None or n == 1:
            key = None
            if self.spec is not None:
                key = self._attach(params, *self._checked_graph(engine, prompt, params), prompt)
            async for out in self._run(engine, prompt, params, request_id, prompt_index, key,
                                       kwargs):
                yield out
            return
        async for out in self._samples(engine, prompt, params, request_id, prompt_index, n,
                                       kwargs):
            yield out

    async def _samples(self, engine: AsyncEngine, prompt: Any, params: Any, request_id: str,
                       prompt_index: int, n: int, kwargs: dict[str, Any]
                       ) -> AsyncIterator[Any]:
        """``n`` samples of one prompt as ``n`` engine requests, merged into the outputs
        vLLM's parallel sampling gives (``output.index`` = the sample; a non-streamed request
        gets one final output holding all ``n``). Sample ``j`` has seed ``seed + j``, as in
        vLLM, so its tokens are those of vLLM's own ``n > 1``. Its choice is
        ``prompt_index * n + j``, as the OpenAI layer numbers choices."""
        from vllm.sampling_params import RequestOutputKind
        from vllm.utils.async_utils import merge_async_iterators

        children = []
        for j in range(n):
            child = copy.copy(params)
            child.n = 1
            if params.seed is not None:
                child.seed = params.seed + j
            children.append(child)
        # the samples share one graph, checked before any runs
        graph, gjson = self._checked_graph(engine, prompt, params, samples=n)
        keys = [self._attach(child, graph, gjson, prompt) for child in children]
        runs = [self._run(engine, prompt, child, f"{j}_{request_id}", prompt_index * n + j,
                          key, kwargs, count_prompt=j == 0)
                for j, (child, key) in enumerate(zip(children, keys, strict=True))]
        final_only = params.output_kind == RequestOutputKind.FINAL_ONLY
        finals: list[Any] = [None] * n
        running = n
        async for j, out in merge_async_iterators(*runs):
            for sample in out.outputs:
                sample.index = j
            if out.finished:
                running -= 1
                finals[j] = out
            if not final_only:
                out.finished = running == 0   # (vLLM's: the parent request finished)
                yield out
        if final_only:
            merged = copy.copy(finals[-1])
            merged.outputs = [f.outputs[0] for f in finals]
            yield merged

    async def _run(self, engine: AsyncEngine, prompt: Any, params: Any, request_id: str,
                   index: int, key: str | None, kwargs: dict[str, Any], *,
                   count_prompt: bool = True) -> AsyncIterator[Any]:
        """One engine request; its outcome and generated tokens are choice ``index``'s."""
        if key is not None:
            self.keys[index] = key
            self._engine = engine
        # counted as outputs arrive, so a request cut short (a client that hung up) still
        # counts what it generated
        counted = None   # generated tokens counted so far (None: not even the prompt yet)
        async for out in engine.generate(prompt, params, request_id,
                                         on_outcome=lambda o: self._outcome_in(index, o),
                                         **kwargs):
            if counted is None:
                if count_prompt:
                    self.tokens += len(out.prompt_token_ids or ())
                counted = 0
            now = generated_so_far(params, counted, out)
            self.tokens += now - counted
            counted = self.generated[index] = now
            yield out

    def _outcome_in(self, index: int, outcome: Outcome) -> None:
        """Keep rendered prompt ``index``'s outcome, its captures counted against the
        request's cap (past it, the outcome fails: the request is too large)."""
        if outcome.error is None:
            self._count(saved_bytes(outcome.saves))
            if self._over_cap is not None:
                outcome.error, outcome.too_large, outcome.saves = self._over_cap, True, {}
        self.outcomes[index] = outcome

    def _count(self, n_bytes: int) -> None:
        self.captured += n_bytes
        if self._over_cap is None and self.captured > self.capture_cap:
            self._over_cap = over_cap_error(self.capture_cap, self.captured,
                                            "prompts" if self._prompts > 1 else "samples")

    def _checked_graph(self, engine: AsyncEngine, prompt: Any, params: Any,
                       samples: int = 1) -> tuple[Graph, str]:
        """The request's graph on this prompt (and its JSON), once its captures' bound, its
        positions and the engine have accepted it (else the HTTP error saying why)."""
        assert self.spec is not None
        ids = list(prompt["prompt_token_ids"])
        need = samples * self.spec.estimate_capture_bytes(len(ids), int(params.max_tokens or 1))
        # the estimates of the request's earlier prompts count: the cap is the request's
        where = " for this prompt" if self._prompts <= 1 else (
            f" for the request's first {self._prompts} prompts")
        try:
            Limiter.check_capture(self.capture_cap, self._estimated + need, where + (
                f" ({samples} samples{' each' if self._prompts > 1 else ''})"
                if samples > 1 else ""))
        except TooLarge as exc:
            raise http_error(exc, 413) from None
        self._estimated += need
        try:
            self.spec.check_prompt(len(ids), int(params.max_tokens or 1))
        except FieldError as exc:
            raise http_error(exc, 400) from None
        graph = self.spec.graph_for(ids)
        try:
            engine.check(graph)   # e.g. a general graph on a prompt longer than one forward
        except ValueError as exc:
            raise http_error(exc, 400) from None
        return graph, graph.model_dump_json()

    def _attach(self, params: Any, graph: Graph, gjson: str, prompt: Any) -> str:
        """Give ``params`` a payload of its own (a new worker key) running ``graph``."""
        payload = Payload(key=f"srv-{uuid.uuid4().hex}", graph_json=gjson, invoke=0,
                          mode="generate", capture_cap=self.capture_cap)
        params.extra_args = {**(params.extra_args or {}), **payload.to_extra_args()}
        rq.isolate_prefix_cache(list(graph.nodes), gjson, prompt, params)
        return payload.key

    async def take_steps(self, index: int) -> dict[int, list[tuple[int, Any]]]:
        """Captures of the steps rendered prompt ``index`` completed so far (streaming)."""
        if index in self._received:
            return self._received.pop(index)
        key = self.keys.get(index)
        if key is None or self._engine is None or index in self.outcomes:
            return {}
        # only the steps before the newest token's forward: it is not part of the generation
        # if that token turns out to be the last (a stop string, noticed later)
        steps = await self._engine.take_steps(key, self.generated.get(index, 0))
        self._count(saved_bytes(steps))
        # past the request's cap: none sent, and the choice's outcome fails when it comes
        return {} if self._over_cap is not None else steps

    def outcome(self, index: int) -> Outcome | None:
        """The worker's outcome for rendered prompt ``index`` (once it finished)."""
        return self.outcomes.get(index)

    def receive(self, steps: dict[int, dict[int, list[tuple[int, Any]]]],
                outcomes: dict[int, Outcome], tokens: int) -> None:
        """Take in what the same request's context computed where the engine runs (a Ray
        replica): step captures, finished prompts' outcomes and token counts, so the app
        reads this context as if the engine were here."""
        for index, parts in steps.items():
            mine = self._received.setdefault(index, {})
            for nid, values in parts.items():
                mine.setdefault(nid, []).extend(values)
        self.outcomes.update(outcomes)
        self.tokens += tokens

    async def counted(self, engine: AsyncEngine, prompt: Any, params: Any, request_id: str,
                      **kwargs: Any) -> AsyncIterator[Any]:
        """An engine request vLLM makes on its own while serving this HTTP request, with
        sampling params of its making (beam search: one per beam and step), run as it is
        and counted into :attr:`tokens`: what it generates, and its prompt unless that
        extends a prompt counted already (a beam's prompt is the request's prompt plus the
        tokens earlier steps generated, counted then; the prefix cache serves it)."""
        ids = tuple(prompt.get("prompt_token_ids") or ()) if isinstance(prompt, dict) else ()
        if not any(ids[:len(seen)] == seen for seen in self._own_prompts):
            self._own_prompts.append(ids)
            self.tokens += len(ids)
        counted = 0
        async for out in engine.llm.generate(prompt, params, request_id, **kwargs):
            now = generated_so_far(params, counted, out)
            self.tokens += now - counted
            counted = now
            yield out


def http_error(exc: Exception, status: int) -> Exception:
    """``exc`` as the error vLLM's serving layer turns into an HTTP status (and SSE error)."""
    from http import HTTPStatus

    from vllm.exceptions import GracefulHTTPError

    if status == 400 and isinstance(exc, FieldError):
        return FieldRefused.of(exc)   # (answered with the field in ``param``)
    err = GracefulHTTPError(str(exc), HTTPStatus(status))
    err.retry_after = getattr(exc, "retry_after", None)  # type: ignore[attr-defined]
    return err


class InterventionClient:
    """The ``EngineClient`` given to vLLM's serving classes: ``AsyncLLM`` plus payloads."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine.llm, name)

    def generate(self, prompt: Any, sampling_params: Any, request_id: str,
                 **kwargs: Any) -> AsyncIterator[Any]:
        extra = sampling_params.extra_args or {}
        ctx = extra.pop(CONTEXT_KEY, None)
        if EXTRA_ARGS_KEY in extra:
            # a client may not hand the worker a payload of its own making (vllm_xargs)
            raise http_error(FieldError("vllm_xargs", f"the key {EXTRA_ARGS_KEY!r} is reserved; "
                                                 "use interventions/capture/graph"), 400)
        if ctx is None:
            # not a request of the HTTP request's own prompts: one vLLM makes on its own
            # while serving it (beam search), charged to that request's key all the same
            ctx = CURRENT_CONTEXT.get()
            if ctx is None:   # (no HTTP request: the warm-up)
                return self._engine.llm.generate(prompt, sampling_params, request_id, **kwargs)
            return ctx.counted(self._engine, prompt, sampling_params, request_id, **kwargs)
        return ctx.generate(self._engine, prompt, sampling_params, request_id, **kwargs)


class EngineHost(Protocol):
    """What the app needs from wherever the engine runs."""

    model_name: str
    model: ModelInfo
    max_model_len: int

    async def completions(self, request: Any, raw_request: Any) -> Any:
        """vLLM's completion handler (response, SSE generator or ``ErrorResponse``)."""

    async def chat(self, request: Any, raw_request: Any) -> Any:
        """vLLM's chat handler."""

    async def models(self) -> Any:
        """``/v1/models``."""

    def check(self, graph: Graph) -> None:
        """Raise ``ValueError`` for graphs the engine cannot run."""

    async def run(self, graph: Graph, *, capture_cap: int | None = None) -> RunResult:
        """Run a whole trace/generate graph."""

    async def stats(self) -> dict[str, Any]:
        """The plugin's counts of state held in the worker."""

    async def check_health(self) -> None:
        """Raise :class:`~vinterp_server.errors.EngineUnavailable` when no engine can take
        requests (cheap: ``/health`` and every failed request ask)."""

    async def engine_metrics(self) -> bytes:
        """The engine's Prometheus metrics when they live in other processes (``b""`` when
        vLLM's ``vllm:*`` metrics are in this process's registry)."""

    async def shutdown(self) -> None:
        """Stop the engine."""


def vllm_serve_args(model_path: str, served_name: str, argv: list[str]) -> argparse.Namespace:
    """vLLM's ``serve`` options (engine and OpenAI front end) parsed from ``argv``."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="vinterp serve (vLLM options)"))
    return parser.parse_args(["--model", model_path, "--served-model-name", served_name, *argv])


def engine_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The engine arguments the user set (those that differ from vLLM's defaults)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    given = AsyncEngineArgs.from_cli_args(args)
    default = AsyncEngineArgs(model=given.model)
    skip = {"model", "served_model_name", "tokenizer"}
    return {f.name: getattr(given, f.name) for f in dataclasses.fields(given)
            if f.name not in skip and getattr(given, f.name) != getattr(default, f.name)}


async def engine_down(host: EngineHost) -> EngineUnavailable | None:
    """Why ``host`` cannot take requests (its engine died), or ``None`` when it can."""
    try:
        await host.check_health()
    except EngineUnavailable as exc:
        return exc
    return None


#: what a request gets once the engine is gone (vLLM's own message says only "EngineCore
#: encountered an issue", with a 500, as if the request were at fault)
ENGINE_DIED = ("the engine stopped (the server log says why) and cannot take requests until "
               "the server is restarted; the request itself was not at fault")


class LocalEngineHost:
    """The engine in this process (the embedded default of ``vinterp serve``)."""

    def __init__(self, engine: AsyncEngine, state: Any, model_name: str) -> None:
        self.engine = engine
        self.state = state
        self.model_name = model_name
        self.model = ModelInfo(engine.arch, engine.num_layers, engine.hidden_size, engine.dtype,
                               engine.vocab_size, engine.module_names)
        self.max_model_len = engine.max_model_len

    @classmethod
    async def start(cls, model: str = "smollm2-135m", vllm_argv: list[str] | None = None
                    ) -> LocalEngineHost:
        """Resolve ``model`` (a vinterp name or HF directory), start the engine, warm it up."""
        from starlette.datastructures import State
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state

        path = resolve_model(model)
        args = vllm_serve_args(str(path), model, list(vllm_argv or ()))
        engine = await AsyncEngine.start(path, **engine_overrides(args))
        try:
            client = InterventionClient(engine)
            state = State()
            tasks = await engine.llm.get_supported_tasks()
            await init_app_state(client, state, args, tasks)  # type: ignore[arg-type]
            host = cls(engine, state, model)
            await host._warm_up()
        except BaseException:
            await engine.shutdown()
            raise
        return host

    async def _warm_up(self) -> None:
        # The first logprobs request compiles/caches sampler paths (seconds on CPU): pay it
        # at start, not on a user's first request.
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest

        req = CompletionRequest(model=self.model_name, prompt="Hello", max_tokens=2,
                                logprobs=1, temperature=0.0)
        await self.completions(req, None)

    async def completions(self, request: Any, raw_request: Any) -> Any:
        return await self.state.openai_serving_completion.create_completion(request,
                                                                             raw_request)

    async def chat(self, request: Any, raw_request: Any) -> Any:
        return await self.state.openai_serving_chat.create_chat_completion(request,
                                                                           raw_request)

    async def models(self) -> Any:
        return await self.state.openai_serving_models.show_available_models()

    def check(self, graph: Graph) -> None:
        self.engine.check(graph)

    async def run(self, graph: Graph, *, capture_cap: int | None = None) -> RunResult:
        return await self.engine.run(graph, capture_cap=capture_cap)

    async def stats(self) -> dict[str, Any]:
        return await self.engine.stats()

    async def check_health(self) -> None:
        if self.engine.llm.errored:   # (a flag: the engine core process died or failed)
            raise EngineUnavailable(ENGINE_DIED, retry_after=30)

    async def engine_metrics(self) -> bytes:
        return b""   # this process's registry has them

    async def shutdown(self) -> None:
        await self.engine.shutdown()

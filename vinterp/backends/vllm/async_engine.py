"""One ``AsyncLLM`` engine with vinterp's plugin, shared by many concurrent callers.

What the server runs on: HTTP requests from many users flow into one continuous batch.

* :meth:`AsyncEngine.generate` wraps ``AsyncLLM.generate``. A request whose
  ``SamplingParams.extra_args`` carry a vinterp payload gets its outcome (saves, error) drained
  from the worker when it finishes; a request that ends early (cancelled, client gone) is
  aborted by vLLM and its worker state released at once.
* Drains are batched: every request that finishes while one drain RPC is in flight joins the
  next one, so the engine sees one RPC per batch of finishers, not one per request.
* :meth:`AsyncEngine.run` runs a whole graph (many invokes, phases) like the offline backend,
  through the same :class:`~vinterp.backends.vllm.runs.GraphRun`.

Example::

    engine = await AsyncEngine.start(resolve_model("tiny-llama"))
    result = await engine.run(graph)             # saves, generated ids
    await engine.shutdown()
"""

from __future__ import annotations

import asyncio
import pathlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from vinterp.backends.base import RunResult
from vinterp.backends.vllm.backend import check_graph
from vinterp.backends.vllm.engine import engine_kwargs, hf_classes_untouched, model_type
from vinterp.backends.vllm.runs import GraphRun, Job
from vinterp.backends.vllm.sampling import hf_sampling_defaults
from vinterp.ir.schema import Graph
from vinterp.models.architectures import Architecture, for_model_type
from vinterp.models.meta import module_names
from vinterp_vllm.payload import Outcome, Payload, outcomes_from_wire
from vinterp_vllm.request_state import DEFAULT_MAX_UNDRAINED
from vllm.sampling_params import RequestOutputKind

#: how many more times :meth:`AsyncEngine.run` sends a job that failed because other requests
#: shared its forwards (its prompt split by chunked prefill, or preempted)
SHARED_RETRIES = 3


def generated_so_far(params: Any, before: int, out: Any) -> int:
    """The tokens a request's sequences hold after output ``out``, ``before`` being the count
    after the previous one: a stream of deltas (``RequestOutputKind.DELTA``) carries only the
    new tokens, the other kinds all of them."""
    n = sum(len(c.token_ids) for c in out.outputs)
    delta = getattr(params, "output_kind", None) == RequestOutputKind.DELTA
    return before + n if delta else n


class Batcher:
    """Coalesces per-key calls into one call over all keys that are waiting.

    ``call(args)`` gets each waiting key with the argument it was asked with and returns a
    dict key → result. While one call is in flight, new keys wait and go together in the
    next. A failed call fails every key of its batch.

    Example::

        drains = Batcher(lambda args: engine_rpc("vinterp_drain", list(args)))
        outcome = await drains.get("key-1")
    """

    def __init__(self, call: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]) -> None:
        self._call = call
        self._pending: dict[str, tuple[Any, asyncio.Future[Any]]] = {}
        self._task: asyncio.Task[None] | None = None
        self.calls = 0

    async def get(self, key: str, arg: Any = None) -> Any:
        """The result for ``key`` (``None`` when the call returned nothing for it)."""
        fut = asyncio.get_running_loop().create_future()
        self._pending[key] = (arg, fut)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        return await fut

    async def _run(self) -> None:
        while self._pending:
            await asyncio.sleep(0)  # let requests finishing in this tick join the batch
            batch, self._pending = self._pending, {}
            self.calls += 1
            try:
                results = await self._call({k: arg for k, (arg, _) in batch.items()})
            except Exception as exc:  # noqa: BLE001 - handed to every waiter
                for _, fut in batch.values():
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for key, (_, fut) in batch.items():
                if not fut.done():
                    fut.set_result(results.get(key))


class AsyncEngine:
    """An ``AsyncLLM`` with vinterp's worker extension installed (see the module docstring).

    Build with :meth:`start`. ``arch`` / ``model_path`` / ``hidden_size`` / ``num_layers``
    describe the model for callers that compile requests (the server).
    """

    def __init__(self, llm: Any, model_path: pathlib.Path) -> None:
        self.llm = llm
        self.model_path = pathlib.Path(model_path)
        self.model_type = model_type(self.model_path)
        self.sampling_defaults = hf_sampling_defaults(self.model_path)
        self.arch: Architecture = for_model_type(self.model_type)
        cfg = llm.vllm_config
        self.dtype = cfg.model_config.dtype
        self.hidden_size = int(cfg.model_config.get_hidden_size())
        self.vocab_size = int(cfg.model_config.get_vocab_size())
        #: the HF model's module paths, to refuse a hand-written graph's unknown modules
        self.module_names = module_names(self.model_path)
        self.num_layers = int(cfg.model_config.hf_config.num_hidden_layers)
        self.max_model_len = int(cfg.model_config.max_model_len)
        self.max_batched_tokens = int(cfg.scheduler_config.max_num_batched_tokens)
        self._drains = Batcher(self._drain_rpc)
        self._releases = Batcher(self._release_rpc)
        self._takes = Batcher(self._take_rpc)
        self._background: set[asyncio.Task[Any]] = set()

    @classmethod
    async def start(cls, model_path: pathlib.Path, *, dtype: str | None = None,
                    **overrides: Any) -> AsyncEngine:
        """Start the engine (its core runs in a separate process) and install the hooks."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        kwargs = engine_kwargs(model_path, dtype=dtype, **overrides)
        with hf_classes_untouched(model_path):
            llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
        try:
            await llm.collective_rpc("vinterp_install", args=(model_type(model_path),))
            # Outcomes wait in the worker from a request's last step until the batched drain
            # reaches it; a whole batch can finish in one step. Keep several batches' worth.
            seqs = int(llm.vllm_config.scheduler_config.max_num_seqs)
            await llm.collective_rpc("vinterp_set_max_undrained",
                                     args=(max(DEFAULT_MAX_UNDRAINED, 8 * seqs),))
        except BaseException:
            llm.shutdown()
            raise
        return cls(llm, model_path)

    # ------------------------------------------------------------------ requests
    async def generate(self, prompt: Any, params: Any, request_id: str, *,
                       on_outcome: Callable[[Outcome], None] | None = None,
                       **kwargs: Any) -> AsyncIterator[Any]:
        """``AsyncLLM.generate``; a payload request's outcome goes to ``on_outcome`` before
        its final output is yielded (a missing outcome becomes an ``Outcome`` with an error).
        """
        payload = Payload.from_extra_args(params.extra_args)
        if payload is not None and int(getattr(params, "n", 1) or 1) > 1:
            from vinterp_vllm.worker import PARALLEL_SAMPLING_REFUSED

            raise ValueError(PARALLEL_SAMPLING_REFUSED)
        done = False
        generated = 0
        try:
            async for out in self.llm.generate(prompt, params, request_id, **kwargs):
                generated = generated_so_far(params, generated, out)
                if out.finished and payload is not None and not done:
                    done = True
                    # the forwards that count: one per generated token (see
                    # RequestState.finish: a stop string can leave one more behind)
                    outcome = await self._drains.get(payload.key, generated)
                    if on_outcome is not None:
                        on_outcome(outcome or Outcome(
                            error="the worker never saw this request (no forward ran for it)"))
                yield out
        finally:
            if payload is not None and not done:
                # aborted (cancelled, disconnected, failed): vLLM aborts the request; free its
                # worker state now, in a task of its own so a cancellation cannot stop it
                self._spawn(self._releases.get(payload.key))

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _drain_rpc(self, steps: dict[str, int]) -> dict[str, Outcome]:
        (blob,) = await self.llm.collective_rpc("vinterp_drain",
                                                args=(list(steps), True, steps))
        return outcomes_from_wire(blob)

    async def take_steps(self, key: str, generated: int) -> dict[int, list[tuple[int, Any]]]:
        """Captures of the steps a running request completed so far (taken out of its final
        outcome): ``save id -> [(step, value)]``, for the steps before ``generated`` (the
        tokens its caller has seen; the forward over the newest may not count, see
        ``RequestState.take_steps``). Batched like drains."""
        return await self._takes.get(key, generated) or {}

    async def _take_rpc(self, before: dict[str, int]) -> dict[str, Any]:
        from vinterp_vllm.wire import unpack

        (blob,) = await self.llm.collective_rpc("vinterp_take_steps",
                                                args=(list(before), before))
        return unpack(blob)

    async def _release_rpc(self, keys: dict[str, Any]) -> dict[str, Any]:
        await self.llm.collective_rpc("vinterp_release", args=(list(keys),))
        return {}

    @property
    def drain_calls(self) -> int:
        """How many drain RPCs were sent so far (batched across requests)."""
        return self._drains.calls

    async def stats(self) -> dict[str, int]:
        """The worker's counts (``vinterp_stats``): states held, request ids tracked, ..."""
        (stats,) = await self.llm.collective_rpc("vinterp_stats")
        return dict(stats)

    # ------------------------------------------------------------------ whole graphs
    def check(self, graph: Graph) -> None:
        """Raise a clear error for what this engine cannot run (before anything is sent)."""
        check_graph(graph, *self.check_args)

    @property
    def check_args(self) -> tuple[Any, ...]:
        """``check_graph``'s arguments after the graph (what a Ray ingress checks with)."""
        return (self.arch, self.dtype, self.max_batched_tokens, self.module_names)

    async def run(self, graph: Graph, *, capture_cap: int | None = None) -> RunResult:
        """Run a whole graph (validated and checked): every prompt one request."""
        run = GraphRun(graph, uuid.uuid4().hex[:12], capture_cap=capture_cap,
                       sampling_defaults=self.sampling_defaults)
        for jobs in run.phases():
            await self._run_jobs(run, jobs)
            # other callers' requests share this engine's forwards: a general graph's prompt
            # can be split (or preempted) even when sent alone, and may fit the next time
            again = run.retries(jobs, shared=True)
            for _ in range(SHARED_RETRIES):
                for job in again:
                    await self._run_jobs(run, [job])
                again = run.retries(again, shared=True)
                if not again:
                    break
            for job in again:
                run.outcomes[job.key].error += (
                    f" (sent {1 + SHARED_RETRIES} times: the engine was busy with other "
                    f"requests every time; send it again later)")
        return run.result()

    async def _run_jobs(self, run: GraphRun, jobs: list[Job]) -> None:
        """Run ``jobs`` concurrently; when one fails (or the caller is cancelled), cancel
        the others and wait for them before raising the first error.

        A bare ``gather`` raised at the first failure and left its siblings generating: the
        caller answered and gave its slot back while the engine went on with requests
        nobody held or was charged for. Cancelling a job's ``generate`` aborts its vLLM
        request and frees its worker state, so nothing of the run outlives it."""
        tasks = [asyncio.ensure_future(self._run_job(run, job)) for job in jobs]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            # (their own errors or cancellations are this failure's consequences)
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _run_job(self, run: GraphRun, job: Job) -> None:
        from vllm.sampling_params import RequestOutputKind

        prompt, params = run.request(job)
        params.output_kind = RequestOutputKind.FINAL_ONLY  # one output per request is enough
        got: list[Outcome] = []
        final = None
        async for out in self.generate(prompt, params, job.payload.key, on_outcome=got.append):
            final = out
        tokens = list(final.outputs[0].token_ids) if final is not None else []
        run.record(job, got[0] if got else None, tokens)

    async def shutdown(self) -> None:
        """Stop the engine (in-flight requests are aborted)."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        self.llm.shutdown()

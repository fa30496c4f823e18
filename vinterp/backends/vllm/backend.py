"""The vLLM backend: runs intervention graphs inside vLLM's continuous batch.

Every prompt of every invoke becomes one vLLM request carrying its own invoke's graph in
``SamplingParams.extra_args``; the plugin (``plugins/vinterp_vllm``) runs it on that request's
rows; captures come back by our own request keys through ``collective_rpc("vinterp_drain")``.
Invokes that use values of other invokes run in dependency phases.

Example::

    >>> from vinterp import LanguageModel                       # doctest: +SKIP
    >>> lm = LanguageModel("tiny-llama", backend="vllm")        # doctest: +SKIP
    >>> with lm.trace("Hello") as t:                            # doctest: +SKIP
    ...     h = lm.model.layers[0].output.save()
"""

from __future__ import annotations

import itertools
import pathlib
from collections.abc import Mapping
from typing import Any

import torch

from vinterp.backends.base import NOT_ON_VLLM, Backend, RunResult
from vinterp.backends.vllm import requests as rq
from vinterp.backends.vllm.engine import build_engine, model_type
from vinterp.backends.vllm.prompt_batches import check_prompt_batches
from vinterp.backends.vllm.runs import GraphRun, Job
from vinterp.backends.vllm.sampling import hf_sampling_defaults
from vinterp.ir import ops
from vinterp.ir.index import graph_index
from vinterp.ir.phases import cross_refs
from vinterp.ir.schema import Graph, Ref
from vinterp.models.architectures import Architecture, for_model_type
from vinterp.models.meta import unknown_module
from vinterp_vllm.calls import call_target
from vinterp_vllm.fastpath import plan_for
from vinterp_vllm.payload import outcomes_from_wire
from vinterp_vllm.request_state import DEFAULT_MAX_UNDRAINED
from vinterp_vllm.points import LOGIT_VALUES, UnsupportedPoint, resolve_point

_GRAD_OPS = frozenset({"backward", "retain_grad", "requires_grad"})
_run_ids = itertools.count()


def check_graph(graph: Graph, arch: Architecture, dtype: torch.dtype,
                max_batched_tokens: int, modules: frozenset[str] = frozenset()) -> None:
    """Raise a clear error for points and ops a vLLM engine cannot serve for ``graph``.

    Shared by the library (at trace time) and the server (before anything reaches the
    engine): one rule, one message. ``modules``: the HF model's module paths
    (``models.meta.module_names``), for graphs written by hand (a module the model does not
    have is refused here; the library's tracer cannot make one).
    """
    if any(not inv.prompts for inv in graph.invokes):
        raise ValueError(
            "a prompt-less tracer.invoke() (the whole batch) is not available on the vllm "
            "backend, where every prompt is its own request; write its code in each invoke "
            "(or use backend='hf')")
    for i, inv in enumerate(graph.invokes):
        names = sorted({name for given in inv.token_inputs for name in given})
        if names:
            raise ValueError(
                f"invoke {i}'s prompts come with {', '.join(names)} (a tokenizer output's "
                f"other per-token inputs), which a vLLM engine cannot take: it runs token ids "
                f"only. Use backend='hf', or pass the prompts without them")
    kinds: dict[tuple[str, str], str] = {}   # point -> value kind (each resolved once)
    logit_views: set[int] = set()   # nodes that are the logits or a view of them
    for n in graph.nodes:
        where = f" (at {n.line})" if n.line else ""
        target = n.args[0].ref if n.args and isinstance(n.args[0], Ref) else None
        if target in logit_views:
            if n.op in ("getitem", "getattr"):
                logit_views.add(n.id)
            elif ops.is_edit(n):   # logits[...] = v, logits += v: vLLM samples without them
                raise UnsupportedPoint(f"writing logits is {NOT_ON_VLLM}{where}")
        if n.invoke < 0 and (n.steps.start, n.steps.stop) != (0, 1):
            raise ValueError(
                f"combining invokes' values at generation steps other than the first, "
                f"outside an invoke, is {NOT_ON_VLLM}{where}; save each invoke's values "
                f"and combine them after the block")
        if n.op in ("read", "write", "call_module"):
            missing = unknown_module(n.kwargs.get("module", ""), modules, arch.layers)
            if missing is not None:
                raise ValueError(f"node {n.id} ({n.op}): {missing}{where}")
        if n.op == "call_module":
            try:   # the final norm and LM head only (the logit lens)
                call_target(arch, n.kwargs.get("module", ""))
            except UnsupportedPoint as exc:
                raise UnsupportedPoint(f"{exc}{where}") from None
            if n.kwargs.get("kwargs"):
                raise UnsupportedPoint(
                    f"model.{n.kwargs['module']}(...) takes one value inside vLLM, without "
                    f"keyword arguments{where}")
        if n.op in _GRAD_OPS or (n.op == "getattr" and n.kwargs.get("name") == "grad"):
            raise UnsupportedPoint(f"gradients are {NOT_ON_VLLM}{where}")
        if n.op in ("read", "write"):
            point = (n.kwargs["module"], n.kwargs["kind"])
            if point not in kinds:
                kinds[point] = resolve_point(arch, *point).value  # type: ignore[arg-type]
            if kinds[point] in LOGIT_VALUES:
                if n.op == "write":
                    raise UnsupportedPoint(f"writing logits is {NOT_ON_VLLM}{where}")
                logit_views.add(n.id)
    check_prompt_batches(graph, kinds)
    _check_cross_invoke(graph)
    # Only prompts longer than one forward's token budget can be split across chunks.
    long = [i for i, inv in enumerate(graph.invokes)
            if max((len(p) for p in inv.prompts), default=0) > max_batched_tokens]
    if not long:
        return
    needs = cross_refs(graph)
    owner = graph_index(graph).owner
    linked = set(needs) | {owner[r] for refs in needs.values() for r in refs}
    grouped = rq.nodes_by_invoke(graph)
    for i in long:
        if i not in linked and plan_for(graph, i, kinds, dtype, nodes=grouped[i]) is not None:
            continue
        longest = max(len(p) for p in graph.invokes[i].prompts)
        raise ValueError(
            f"invoke {i}: a prompt of {longest} tokens exceeds max_num_batched_tokens="
            f"{max_batched_tokens}; this graph indexes or mixes positions, so the "
            f"vllm backend needs the whole prompt in one forward. Raise "
            f"max_num_batched_tokens, or use steering ops and whole-value saves only")


def _check_cross_invoke(graph: Graph) -> None:
    """What an invoke may do with another invoke's values here: each invoke runs as its own
    requests, and a value another invoke uses is handed over as a copy, after the invoke
    that computes it has finished (its last value, when it runs at several steps). So an
    edit of another invoke's value would change only the copy, and a value of several steps
    would be the last one at every step: both refused, where the HF backend runs them."""
    owner = graph_index(graph).owner
    by_id = {n.id: n for n in graph.nodes}
    for n in graph.nodes:
        # (a ``write`` assigns its first argument to the invoke's own point: not an edit of it)
        if n.invoke < 0 or n.op == "write" or not ops.is_edit(n) or not n.args or \
                not isinstance(n.args[0], Ref):
            continue
        ref: int | None = n.args[0].ref
        while ref is not None:   # the edited value and what it is a view of
            if owner[ref] >= 0 and owner[ref] != n.invoke:
                where = f" (at {n.line})" if n.line else ""
                raise ValueError(
                    f"invoke {n.invoke} edits a value of invoke {owner[ref]}{where}: on the "
                    f"vllm backend each invoke runs as its own requests, and the edit would "
                    f"reach only a copy; make the edit inside invoke {owner[ref]}")
            src = by_id[ref]
            view = ops.is_view(src.op, src.kwargs.get("name")) and src.args and \
                isinstance(src.args[0], Ref)
            ref = src.args[0].ref if view else None
    for i, refs in cross_refs(graph).items():
        for r in sorted(refs):
            steps = by_id[r].steps
            if steps.stop is None or steps.stop - steps.start > 1:
                where = f" (at {by_id[r].line})" if by_id[r].line else ""
                raise ValueError(
                    f"invoke {i} uses a value invoke {owner[r]} computes at every generation "
                    f"step{where}: on the vllm backend invoke {owner[r]} runs first and only "
                    f"its last step's value would reach invoke {i}; share a value of one "
                    f"step (e.g. the prompt's, outside `tracer.all()`), or save each invoke's "
                    f"values and combine them after the block")


class VllmBackend(Backend):
    """Graphs run as vLLM requests with vinterp's worker extension.

    ``engine_kwargs`` go to ``vllm.LLM`` (e.g. ``max_num_batched_tokens``,
    ``enable_prefix_caching``, ``kv_cache_memory_bytes``); ``dtype`` defaults to float32 so
    numbers match the HF backend.
    """

    name = "vllm"

    def __init__(self, model_path: pathlib.Path, *, dtype: str | None = None,
                 **engine_kwargs: Any) -> None:
        self.model_path = pathlib.Path(model_path)
        self.arch = for_model_type(model_type(self.model_path))
        self.sampling_defaults = hf_sampling_defaults(self.model_path)
        self.llm = build_engine(self.model_path, dtype=dtype, **engine_kwargs)
        sched = self.llm.llm_engine.vllm_config.scheduler_config
        self.max_batched_tokens = int(sched.max_num_batched_tokens)
        self.dtype = self.llm.llm_engine.vllm_config.model_config.dtype
        self._undrained_cap = DEFAULT_MAX_UNDRAINED
        from vllm.v1.engine.core_client import InprocClient

        # (the default: build_engine keeps the engine core in this process)
        self._engine_in_process = isinstance(self.llm.llm_engine.engine_core, InprocClient)

    # ------------------------------------------------------------------ checks
    def check(self, graph: Graph) -> None:
        """Raise at trace time for points and ops vLLM cannot serve."""
        check_graph(graph, self.arch, self.dtype, self.max_batched_tokens)

    def has_point(self, module: str, kind: str) -> bool:
        """Whether vLLM can serve ``module.kind`` (``tracer.cache()`` keeps only those)."""
        try:
            resolve_point(self.arch, module, kind)
        except (UnsupportedPoint, KeyError, ValueError):
            return False
        return True

    @property
    def device(self) -> torch.device:
        """The device the engine runs the model on."""
        cfg = self.llm.llm_engine.vllm_config.device_config
        device = getattr(cfg, "device", None)
        return device if isinstance(device, torch.device) else torch.device(cfg.device_type)

    # ------------------------------------------------------------------ run
    def run(self, graph: Graph, *, live: Mapping[int, torch.Tensor] | None = None
            ) -> RunResult:
        """Run ``graph``: one request per prompt, phases for cross-invoke values."""
        run = GraphRun(graph, str(next(_run_ids)), sampling_defaults=self.sampling_defaults)
        for jobs in run.phases():
            self._generate(run, jobs)
            for job in run.retries(jobs):
                self._generate(run, [job])
        return run.result()

    def _generate(self, run: GraphRun, jobs: list[Job]) -> None:
        if len(jobs) > self._undrained_cap:
            # every job finishes before the drain below: the worker must keep them all (its
            # retention cap drops the oldest undrained states past it)
            self._undrained_cap = 2 * len(jobs)
            self.llm.collective_rpc("vinterp_set_max_undrained", args=(self._undrained_cap,))
        requests = [run.request(job) for job in jobs]
        outs = None
        try:
            outs = self.llm.generate([p for p, _ in requests], [sp for _, sp in requests],
                                     use_tqdm=False)
        finally:
            # the forwards that count: one per generated token (RequestState.finish)
            steps = None if outs is None else {
                job.payload.key: len(out.outputs[0].token_ids)
                for job, out in zip(jobs, outs, strict=True)}
            # in-process: the outcomes themselves, no trip through bytes
            got = self.llm.collective_rpc("vinterp_drain", args=(
                [job.payload.key for job in jobs], not self._engine_in_process, steps))[0]
            drained = got if self._engine_in_process else outcomes_from_wire(got)
        for job, out in zip(jobs, outs, strict=True):
            run.record(job, drained.get(job.payload.key), out.outputs[0].token_ids)

    def close(self) -> None:
        """Shut the engine down now, freeing its memory (other engines in this process keep
        working: the plugin keeps vLLM's shared parallel groups while one lives)."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            del self.llm
            client = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
            if client is not None:
                client.shutdown()

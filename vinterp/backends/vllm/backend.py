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
from typing import Any, NamedTuple

import torch

from vinterp.backends.base import NOT_ON_VLLM, Backend, RunResult
from vinterp.backends.vllm import requests as rq
from vinterp.backends.vllm.engine import build_engine, model_type
from vinterp.backends.vllm.sampling import sampling_params
from vinterp.ir.interpreter import (
    GraphRunner, InterventionError, RunState, collect_results, cross_refs, invoke_phases,
)
from vinterp.ir.schema import Graph
from vinterp.ir.tensors import encode_tensor
from vinterp.models.architectures import for_model_type
from vinterp_vllm.fastpath import plan_for
from vinterp_vllm.payload import Outcome, Payload, outcomes_from_wire
from vinterp_vllm.points import UnsupportedPoint, resolve_point

_GRAD_OPS = frozenset({"backward", "retain_grad", "requires_grad"})
_run_ids = itertools.count()


def _run_globals(graph: Graph, values: dict[int, Any]) -> dict[int, Any]:
    """Run the nodes outside any invoke (they combine invokes' values) on the client."""
    if not any(n.invoke < 0 for n in graph.nodes):
        return {}
    state = RunState(env=dict(values), env_step={r: 0 for r in values})
    runner = GraphRunner(graph, state=state, active_invokes=[])
    runner.begin_step(0)
    runner.end_step()
    return collect_results(graph, state)


def _cat(values: list[Any]) -> Any:
    """Join one invoke's per-prompt values along the batch dimension (lists: per step)."""
    if len(values) == 1:
        return values[0]
    if all(isinstance(v, list) for v in values):
        return [_cat(list(vs)) for vs in zip(*values, strict=False)]
    if all(isinstance(v, torch.Tensor) for v in values):
        try:
            return torch.cat(values, dim=0)
        except RuntimeError:
            return values  # different lengths: one value per prompt
    return values


class Job(NamedTuple):
    """One vLLM request of a run: a prompt of an invoke and the payload it carries."""

    key: Any                 # where its outcome goes, e.g. (invoke, prompt index)
    prompt_ids: list[int]
    payload: Payload
    graph: Graph             # the whole trace's graph
    invoke: int              # the invoke in ``graph`` (the payload's may be renumbered)
    node_ids: list[int] | None = None   # compact request graph: its node ids in ``graph``


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
        self.llm = build_engine(self.model_path, dtype=dtype, **engine_kwargs)
        sched = self.llm.llm_engine.vllm_config.scheduler_config
        self.max_batched_tokens = int(sched.max_num_batched_tokens)
        self.dtype = self.llm.llm_engine.vllm_config.model_config.dtype

    # ------------------------------------------------------------------ checks
    def check(self, graph: Graph) -> None:
        """Raise at trace time for points and ops vLLM cannot serve."""
        kinds: dict[tuple[str, str], str] = {}   # point -> value kind (each resolved once)
        for n in graph.nodes:
            where = f" (at {n.line})" if n.line else ""
            if n.invoke < 0 and (n.steps.start, n.steps.stop) != (0, 1):
                raise ValueError(
                    f"combining invokes' values at generation steps other than the first, "
                    f"outside an invoke, is {NOT_ON_VLLM}{where}; save each invoke's values "
                    f"and combine them after the block")
            if n.op in _GRAD_OPS or (n.op == "getattr" and n.kwargs.get("name") == "grad"):
                raise UnsupportedPoint(f"gradients are {NOT_ON_VLLM}{where}")
            if n.op in ("read", "write"):
                point = (n.kwargs["module"], n.kwargs["kind"])
                if point not in kinds:
                    kinds[point] = resolve_point(self.arch, *point).value  # type: ignore[arg-type]
                if n.op == "write" and kinds[point] in ("logits", "model_output"):
                    raise UnsupportedPoint(f"writing logits is {NOT_ON_VLLM}{where}")
        # Only prompts longer than one forward's token budget can be split across chunks.
        long = [i for i, inv in enumerate(graph.invokes)
                if max((len(p) for p in inv.prompts), default=0) > self.max_batched_tokens]
        if not long:
            return
        needs = cross_refs(graph)
        owner = {n.id: n.invoke for n in graph.nodes}
        linked = set(needs) | {owner[r] for refs in needs.values() for r in refs}
        grouped = rq.nodes_by_invoke(graph)
        for i in long:
            if i not in linked and plan_for(graph, i, kinds, self.dtype,
                                            nodes=grouped[i]) is not None:
                continue
            longest = max(len(p) for p in graph.invokes[i].prompts)
            raise ValueError(
                f"invoke {i}: a prompt of {longest} tokens exceeds max_num_batched_tokens="
                f"{self.max_batched_tokens}; this graph indexes or mixes positions, so the "
                f"vllm backend needs the whole prompt in one forward. Raise "
                f"max_num_batched_tokens, or use steering ops and whole-value saves only")

    # ------------------------------------------------------------------ run
    def run(self, graph: Graph) -> RunResult:
        """Run ``graph``: one request per prompt, phases for cross-invoke values."""
        run_id = next(_run_ids)
        needs = cross_refs(graph)
        exported: dict[int, set[int]] = {}
        owner = {n.id: n.invoke for n in graph.nodes}
        for refs in [*needs.values(), rq.global_refs(graph)]:
            for r in refs:
                exported.setdefault(owner[r], set()).add(r)
        outcomes: dict[tuple[int, int], Outcome] = {}
        generated: dict[tuple[int, int], torch.Tensor] = {}
        export_values: dict[int, Any] = {}
        splitter = rq.GraphSplitter(graph)
        for phase in invoke_phases(graph, needs):
            jobs = []
            for i in phase:
                if i >= len(graph.invokes):
                    continue
                imports = {str(r): encode_tensor(torch.as_tensor(export_values[r]))
                           .model_dump(mode="json") for r in sorted(needs.get(i, ()))}
                # self-contained invokes get compact graphs that equal invokes share
                compact = None if imports or exported.get(i) else splitter.request_json(i)
                gjson, ids = compact or (splitter.subgraph_json(i), None)
                at = i if compact is None else 0
                for j, prompt in enumerate(graph.invokes[i].prompts):
                    payload = Payload(key=f"vinterp-{run_id}/{i}/{j}", graph_json=gjson,
                                      invoke=at, mode=graph.mode, imports=imports,
                                      exports=tuple(sorted(exported.get(i, ()))))
                    jobs.append(Job((i, j), list(prompt), payload, graph, i, ids))
            self._submit(jobs, outcomes, generated)
            for i in phase:
                for r in exported.get(i, ()):
                    n_prompts = len(graph.invokes[i].prompts)
                    export_values[r] = _cat([outcomes[(i, j)].exports[r]
                                             for j in range(n_prompts)])
        result = self._collect(graph, outcomes, generated)
        result.saves.update(_run_globals(graph, export_values))
        return result

    def _submit(self, jobs: list[Job], outcomes: dict, generated: dict) -> None:
        batch = jobs
        while batch:
            self._generate(batch, outcomes, generated)
            # a general graph whose prompt got split by chunked prefill: alone, it fits
            retry = [job for job in batch if outcomes[job.key].retry_alone]
            if len(retry) == len(batch) and len(batch) == 1:
                break
            for job in retry:
                self._generate([job], outcomes, generated)
            batch = []

    def _generate(self, jobs: list[Job], outcomes: dict, generated: dict) -> None:
        prompts, params = [], []
        grouped: dict[int, dict[int, list]] = {}   # graph -> its nodes by invoke
        for _, ids, payload, graph, i, _ in jobs:
            gj = payload.graph_json
            prompt: dict[str, Any] = {"prompt_token_ids": ids}
            if id(graph) not in grouped:
                grouped[id(graph)] = rq.nodes_by_invoke(graph)
            mine = grouped[id(graph)][i]
            if rq.writes(mine):
                prompt["cache_salt"] = rq.fingerprint(gj)
            skip = True if rq.reads_prompt(mine) else None
            prompts.append(prompt)
            generation = {**graph.generation, **graph.invokes[i].generation}
            params.append(sampling_params(generation, mode=graph.mode,
                                          extra_args=payload.to_extra_args(),
                                          skip_reading_prefix_cache=skip))
        try:
            outs = self.llm.generate(prompts, params, use_tqdm=False)
        finally:
            drained = outcomes_from_wire(self.llm.collective_rpc(
                "vinterp_drain", args=([job.payload.key for job in jobs],))[0])
        for (key, ids, payload, _, _, orig), out in zip(jobs, outs, strict=True):
            o = drained.get(payload.key, Outcome(
                error="the worker never saw this request (no forward ran for it)"))
            if orig is not None:  # compact request graph: back to the trace's node ids
                o.saves = {orig[k]: v for k, v in o.saves.items()}
            outcomes[key] = o
            new = list(out.outputs[0].token_ids)
            generated[key] = torch.tensor(ids + new, dtype=torch.long)

    def _collect(self, graph: Graph, outcomes: dict, generated: dict) -> RunResult:
        errors = [f"invoke {i}, prompt {j}: {o.error}"
                  for (i, j), o in sorted(outcomes.items()) if o.error]
        if errors:
            raise InterventionError("; ".join(errors))
        saves: dict[int, Any] = {}
        for n in graph.nodes:
            if n.op != "save" or n.invoke < 0:
                continue  # (saves outside any invoke come from _run_globals)
            inv = n.invoke
            per_prompt = [outcomes[(inv, j)].saves[n.id]
                          for j in range(len(graph.invokes[inv].prompts))
                          if n.id in outcomes[(inv, j)].saves]
            if per_prompt:
                saves[n.id] = _cat(per_prompt)
        result = RunResult(saves=saves)
        if graph.mode == "generate":
            result.generated = [generated[(i, j)] for i, inv in enumerate(graph.invokes)
                                for j in range(len(inv.prompts))]
        return result

    def close(self) -> None:
        """Shut the engine down."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            del self.llm

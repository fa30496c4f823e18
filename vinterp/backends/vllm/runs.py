"""How a whole graph becomes vLLM requests: phases, payloads, results.

One :class:`GraphRun` holds everything about running a graph on vLLM except *how* requests
reach the engine, so the offline ``LLM`` backend (:mod:`.backend`) and the ``AsyncLLM`` engine
the server uses (:mod:`.async_engine`) share it. A driver walks :meth:`GraphRun.phases`,
sends each phase's :class:`Job` s (``request`` gives a job's prompt and ``SamplingParams``),
hands each outcome to :meth:`GraphRun.record`, re-sends :meth:`GraphRun.retries` alone, and
reads :meth:`GraphRun.result` at the end.

Example::

    run = GraphRun(graph, "run-1")
    for jobs in run.phases():
        for job in jobs:
            prompt, params = run.request(job)
            ...                      # generate, drain the worker's outcome by job.payload.key
            run.record(job, outcome, new_token_ids)
    result = run.result()
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import torch

from vinterp.backends.base import RunResult
from vinterp.backends.vllm import requests as rq
from vinterp.backends.vllm.sampling import sampling_params
from vinterp.ir.errors import CaptureLimitError, InterventionError
from vinterp.ir.interpreter import GraphRunner
from vinterp.ir.phases import cross_refs, invoke_phases
from vinterp.ir.run_state import RunState, collect_results
from vinterp.ir.index import graph_index
from vinterp.ir.schema import Graph
from vinterp.ir.tensors import encode_tensor
from vinterp_vllm.payload import Outcome, Payload
from vinterp_vllm.request_state import saved_bytes


class Job(NamedTuple):
    """One vLLM request of a run: a prompt of an invoke and the payload it carries."""

    key: tuple[int, int]     # (invoke, prompt index): where its outcome goes
    prompt_ids: list[int]
    payload: Payload
    invoke: int              # the invoke in the run's graph (the payload's may be renumbered)
    node_ids: list[int] | None = None   # compact request graph: its node ids in the graph


def _cat(values: list[Any]) -> Any:
    """Join one invoke's per-prompt values along the batch dimension (lists: per step).

    ``None`` marks a prompt with no value: it ended (EOS) while the invoke's other prompts
    went on, and vLLM, unlike batched HF generation, computes no rows for it. Its rows are
    NaN, so that row ``i`` stays prompt ``i`` (a value with only the running prompts' rows
    shifted them silently).
    """
    if len(values) == 1:
        return values[0]
    if all(isinstance(v, list) or v is None for v in values):
        steps = max(len(v) for v in values if v is not None)
        padded = [(v or []) + [None] * (steps - len(v or [])) for v in values]
        return [_cat(list(vs)) for vs in zip(*padded, strict=True)]
    like = next((v for v in values if isinstance(v, torch.Tensor)), None)
    if like is not None and like.is_floating_point():
        values = [torch.full_like(like, float("nan")) if v is None else v for v in values]
        if all(isinstance(v, torch.Tensor) and v.dim() == like.dim() for v in values):
            values = _pad_left(values)
    if all(isinstance(v, torch.Tensor) for v in values):
        try:
            return torch.cat(values, dim=0)
        except RuntimeError:
            return values  # no common layout (an int value of different lengths): a list
    return values


def _pad_left(values: list[torch.Tensor]) -> list[torch.Tensor]:
    """Prompts of different lengths laid out as ``hf`` batches them: each value padded on
    the left of every dim after the batch's to the longest, with NaN (vLLM runs no padding,
    so there is no value there), so ``h[:, -1]`` is each prompt's last token on both."""
    width = [max(v.shape[d] for v in values) for d in range(1, values[0].dim())]
    out = []
    for v in values:
        pad: list[int] = []
        for d in reversed(range(1, v.dim())):
            pad += [width[d - 1] - v.shape[d], 0]
        out.append(torch.nn.functional.pad(v, pad, value=float("nan")) if any(pad) else v)
    return out


def over_cap_error(cap: int, total: int, what: str = "prompts") -> str:
    """Why a request whose ``what`` (its prompts, samples) captured ``total`` bytes together
    failed: more than ``cap``, the cap of the whole request."""
    return (f"captures exceeded this request's cap of {cap} bytes: its {what} captured "
            f"{total} bytes together (the cap holds for the whole request, not for each "
            f"prompt); save fewer points, positions (e.g. x[:, -1]) or steps, send fewer "
            f"prompts per request, or ask for a larger cap (capture_cap= in the library; a "
            f"server key's capture_bytes limit)")


def run_globals(graph: Graph, values: dict[int, Any]) -> dict[int, Any]:
    """Run the nodes outside any invoke (they combine invokes' values) on the caller's side."""
    if not any(n.invoke < 0 for n in graph.nodes):
        return {}
    state = RunState(env=dict(values), env_step={r: 0 for r in values})
    runner = GraphRunner(graph, state=state, active_invokes=[])
    runner.begin_step(0)
    runner.end_step()
    return collect_results(graph, state)


class GraphRun:
    """The requests of one graph and what came back for them (see the module docstring).

    ``run_id`` makes payload keys unique among everything in flight on one engine.
    ``capture_cap`` bounds what the whole run may capture (bytes, all its requests together:
    each request's payload carries the cap, so the worker stops one request past it, and
    :meth:`record` fails the run once its requests' saves add up past it). ``sampling_defaults``
    (:func:`~vinterp.backends.vllm.sampling.hf_sampling_defaults` of the engine's model) fill
    what the graph's generation arguments leave unset, as HF ``generate`` would.
    """

    def __init__(self, graph: Graph, run_id: str, *, capture_cap: int | None = None,
                 sampling_defaults: dict[str, Any] | None = None) -> None:
        self.graph = graph
        self.sampling_defaults = sampling_defaults
        self.run_id = run_id
        self.capture_cap = capture_cap
        self.needs = cross_refs(graph)
        owner = graph_index(graph).owner
        self.exported: dict[int, set[int]] = {}
        for refs in [*self.needs.values(), rq.global_refs(graph)]:
            for r in refs:
                self.exported.setdefault(owner[r], set()).add(r)
        self.outcomes: dict[tuple[int, int], Outcome] = {}
        #: bytes of the saves recorded so far (held against ``capture_cap``)
        self.captured_bytes = 0
        self.generated: dict[tuple[int, int], torch.Tensor] = {}
        self.export_values: dict[int, Any] = {}
        self._splitter = rq.GraphSplitter(graph)
        self._by_invoke = rq.nodes_by_invoke(graph)

    # ------------------------------------------------------------------ requests
    def phases(self) -> Iterator[list[Job]]:
        """Each dependency phase's jobs; a phase's outcomes must be recorded before the next."""
        graph = self.graph
        for phase in invoke_phases(graph, self.needs):
            jobs = []
            for i in phase:
                if i >= len(graph.invokes):
                    continue
                jobs.extend(self._jobs(i))
            yield jobs
            if any(self.outcomes[job.key].error for job in jobs):
                return   # (nothing to hand over: result() raises the requests' own errors)
            for i in phase:
                for r in self.exported.get(i, ()):
                    n_prompts = len(graph.invokes[i].prompts)
                    self.export_values[r] = _cat([self.outcomes[(i, j)].exports[r]
                                                  for j in range(n_prompts)])

    def _jobs(self, i: int) -> list[Job]:
        graph = self.graph
        imports = {str(r): encode_tensor(torch.as_tensor(self.export_values[r]))
                   .model_dump(mode="json") for r in sorted(self.needs.get(i, ()))}
        # self-contained invokes get compact graphs that equal invokes share
        compact = None if imports or self.exported.get(i) else self._splitter.request_json(i)
        gjson, ids = compact or (self._splitter.subgraph_json(i), None)
        at = i if compact is None else 0
        extra = {} if self.capture_cap is None else {"capture_cap": self.capture_cap}
        return [Job((i, j), list(prompt),
                    Payload(key=f"vinterp-{self.run_id}/{i}/{j}", graph_json=gjson, invoke=at,
                            mode=graph.mode, imports=imports,
                            exports=tuple(sorted(self.exported.get(i, ()))), **extra),
                    i, ids)
                for j, prompt in enumerate(graph.invokes[i].prompts)]

    def request(self, job: Job) -> tuple[dict[str, Any], Any]:
        """The job's vLLM prompt (token ids, and a cache salt when it writes) and params."""
        prompt: dict[str, Any] = {"prompt_token_ids": job.prompt_ids}
        generation = {**self.graph.generation, **self.graph.invokes[job.invoke].generation}
        if isinstance(generation.get("seed"), int):
            # vLLM gives each seeded request a generator of its own: one seed for all would
            # sample every copy of a prompt alike. Row k gets seed + k (HF seeds the batch
            # once; the server's n > 1 samples take seed + j the same way)
            generation["seed"] += self._row(job.key)
        params = sampling_params(generation, mode=self.graph.mode,
                                 extra_args=job.payload.to_extra_args(),
                                 defaults=self.sampling_defaults)
        rq.isolate_prefix_cache(self._by_invoke[job.invoke], job.payload.graph_json, prompt,
                                params, job.payload.imports)
        return prompt, params

    def _row(self, key: tuple[int, int]) -> int:
        """The batch row of prompt ``j`` of invoke ``i`` (invokes in order, then prompts)."""
        i, j = key
        return sum(len(inv.prompts) for inv in self.graph.invokes[:i]) + j

    # ------------------------------------------------------------------ outcomes
    def record(self, job: Job, outcome: Outcome | None, new_tokens: list[int]) -> None:
        """What the worker handed back for ``job`` (``None``: it never saw the request)."""
        o = outcome or Outcome(error="the worker never saw this request (no forward ran for it)")
        if job.node_ids is not None:  # compact request graph: back to the trace's node ids
            o.saves = {job.node_ids[k]: v for k, v in o.saves.items()}
        if o.error is None and self.capture_cap is not None:
            # the cap is the whole run's (a server key's capture_bytes is per HTTP request):
            # each payload alone may hold up to it, so add them up here
            self.captured_bytes += saved_bytes(o.saves)
            if self.captured_bytes > self.capture_cap:
                o.error = over_cap_error(self.capture_cap, self.captured_bytes)
                o.too_large = True
                o.saves = {}
        self.outcomes[job.key] = o
        self.generated[job.key] = torch.tensor(job.prompt_ids + list(new_tokens),
                                               dtype=torch.long)

    def retries(self, jobs: list[Job], *, shared: bool = False) -> list[Job]:
        """Jobs to send again, each alone: their general graph's prompt was split by chunked
        prefill (or preempted), which running alone fixes. Offline, none when the phase had
        one job: it ran alone already. ``shared``: the engine serves other callers too (the
        server's), so even a job alone in its phase shared its forwards with their requests
        and may fit when sent again."""
        retry = [job for job in jobs if self.outcomes[job.key].retry_alone]
        return retry if shared or len(jobs) > 1 else []

    def result(self) -> RunResult:
        """Saves (and generated ids) of the whole graph; raises if any request failed."""
        graph = self.graph
        errors = [f"invoke {i}, prompt {j}: {o.error}"
                  for (i, j), o in sorted(self.outcomes.items()) if o.error]
        if errors:
            big = any(o.too_large for o in self.outcomes.values())
            raise (CaptureLimitError if big else InterventionError)("; ".join(errors))
        saves: dict[int, Any] = {}
        for n in graph.nodes:
            if n.op != "save" or n.invoke < 0:
                continue  # (saves outside any invoke come from run_globals)
            inv = n.invoke
            per_prompt = [self.outcomes[(inv, j)].saves.get(n.id)
                          for j in range(len(graph.invokes[inv].prompts))]
            if any(v is not None for v in per_prompt):
                saves[n.id] = _cat(per_prompt)
        saves.update(run_globals(graph, self.export_values))
        result = RunResult(saves=saves)
        if graph.mode == "generate":
            result.generated = [self.generated[(i, j)] for i, inv in enumerate(graph.invokes)
                                for j in range(len(inv.prompts))]
        return result

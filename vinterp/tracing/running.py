"""Running a finished trace and handing its results back to the user's proxies.

When the ``with`` block ends, the recording is built into a graph (see
:mod:`vinterp.tracing.build`) and run: on the model's backend, on a server (``remote=True``;
``tracer.wait()`` collects a non-blocking run), or with the other traces of a remote session
when the session ends. The backend's saves come back keyed by graph node id; this module maps
them back to the trace's nodes, runs the nodes computed from the generated ids (they need the
finished generation), drops values of generation steps an invoke never reached, and rebinds
the user's names to values. Separate from the tracer: it reads a finished recording, it does
not record.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from vinterp import ir
from vinterp.ir.interpreter import GraphRunner
from vinterp.ir.run_state import RunState
from vinterp.ir.schema import Steps
from vinterp.ir.validate import node_refs
from vinterp.tracing.build import build_graph
from vinterp.tracing.errors import TracingError
from vinterp.tracing.generated import _GeneratedEvent, _pad_generated, _SampledEvent
from vinterp.tracing.kept import _drop_proxies
from vinterp.tracing.rebind import realize, rebind_frame

if TYPE_CHECKING:
    from vinterp.tracing.tracer import Tracer


def run(tracer: Tracer) -> None:
    """Build ``tracer``'s graph and run it (or queue it in its remote session, or submit it
    for ``tracer.wait()``); the trace is finished afterwards, whether the run failed or not."""
    try:
        tracer._graph = ir.load(build_graph(tracer))
        backend = tracer.remote or \
            (tracer.lm._scan_backend() if tracer.scan else tracer.lm._backend)
        named = [t.named for t in tracer._graph.tensors if isinstance(t, ir.NamedTensor)]
        if named and tracer.remote is None:
            raise ValueError(f"the named vector {named[0]!r} lives on a vinterp server: run "
                             f"this trace with remote=True (or pass the tensor itself)")
        backend.check(tracer._graph)
        if tracer._session is not None:   # runs with the session's other traces, at its end
            tracer._session.add(tracer)
            return
        if tracer.remote is not None and not tracer.remote.blocking:
            tracer.handle = tracer.remote.submit(tracer._graph)   # results: tracer.wait()
            return
        result = backend.run(tracer._graph, live=tracer.live_tensors)
    finally:
        tracer.finished = True
    apply_result(tracer, result)


def apply_result(tracer: Tracer, result: Any) -> None:
    """Give ``tracer``'s saved proxies (and caches, logs, kept objects, the user's names) the
    values of a backend's ``result``."""
    saves = result.saves
    if tracer._device_ids is not None:  # back to the trace's node ids
        back = {new: old for old, new in tracer._device_ids.items()}
        saves = {back[k]: v for k, v in saves.items() if k in back}
        hidden = {r: result.saves[k] for r, k in tracer._hidden.items() if k in result.saves}
        saves.update(_run_post(tracer, result.generated, hidden))
    tracer._result = result.generated
    _drop_unreached(tracer, saves)
    missing = []
    for proxy in tracer.saved:
        if proxy._id in saves:
            object.__setattr__(proxy, "_value", saves[proxy._id])
            object.__setattr__(proxy, "_has_value", True)
        elif proxy._id not in tracer._unreached:
            missing.append(proxy._id)
    for proxy in tracer.saved:
        if not proxy._has_value and proxy._id in tracer._unreached:
            # a name a step loop (or `with tracer.all()` body) rebound each step: nnsight's
            # loop ended at the last step that ran, so the name holds that step's value
            prev = tracer._fallback.get(proxy._id)
            while prev is not None and not prev._has_value:
                prev = tracer._fallback.get(prev._id)
            if prev is not None:
                object.__setattr__(proxy, "_value", prev._value)
                object.__setattr__(proxy, "_has_value", True)
    if missing and not any(n.op == "stop" for n in tracer._graph.nodes):
        # (with tracer.stop(), saves after the stop point are legitimately absent)
        raise TracingError(
            f"the {(tracer.remote or tracer.lm._backend).name} backend returned no value for "
            f"saved node(s) {missing}; "
            "this is a vinterp bug, please report it with tracer.to_json()")
    for cache in tracer._caches:
        for entry in cache.values():
            entry.output = realize(entry.output)[0]
            entry.inputs = realize(entry.inputs)[0]
    for items in tracer._logs:
        print(*(realize(v)[0] for v in items))
    unreached = tracer._unreached
    for obj in tracer._kept:
        # nnsight's loop simply stops at the last step that ran: no item for the others
        _drop_proxies(obj, unreached, 0)
        realize(obj)
    if tracer._frame is not None:
        rebind_frame(tracer._frame)
        tracer._frame = None


def _steps_run(tracer: Tracer) -> dict[int, int]:
    """invoke -> generation steps it ran (= new tokens: its budget, or up to EOS)."""
    rows = iter(tracer._result or ())
    out = {}
    for i, prompts in enumerate(tracer.invokes):
        if prompts:
            out[i] = max(len(next(rows)) - len(p) for p in prompts)
    out[-1] = max(out.values(), default=0)
    for i, prompts in enumerate(tracer.invokes):
        if not prompts:   # a prompt-less invoke is the whole batch
            out[i] = out[-1]
    return out


def _drop_unreached(tracer: Tracer, saves: dict[int, Any]) -> None:
    """Single-step saves at steps past their invoke's end are not part of its result.

    (Batched HF generation keeps computing rows that have ended, vLLM does not: dropping
    them gives both backends the values of each request run alone.)
    """
    if tracer.mode != "generate" or tracer._result is None:
        return
    ran = _steps_run(tracer)
    for proxy in tracer.saved:
        node = tracer.nodes[proxy._id]
        stop = node.steps.stop
        if stop is not None and stop - node.steps.start == 1 \
                and node.steps.start >= ran[node.invoke]:
            tracer._unreached.add(proxy._id)
            saves.pop(proxy._id, None)
            # the unsaved value the user holds: same explanation when touched
            for r in node_refs(node):
                tracer._unreached.add(r)


def _run_post(tracer: Tracer, generated: list[torch.Tensor] | None,
              values: dict[int, Any]) -> dict[int, Any]:
    """Run the nodes computed from the generated ids, here, on the finished generation.

    They form a graph of their own whose one point is ``generator.output``; model values
    they use came back as hidden saves (``values``).
    """
    if generated is None:
        return {}
    pad = tracer.lm._pad_id
    rows: dict[int, torch.Tensor] = {}
    start = 0
    for i, prompts in enumerate(tracer.invokes):
        if not prompts:
            continue
        lens = [len(p) for p in prompts]
        rows[i] = _pad_generated(generated[start:start + len(prompts)], lens, pad)
        start += len(prompts)
    rows[-1] = _pad_generated(list(generated), [len(p) for ps in tracer.invokes for p in ps],
                              pad)
    for i, prompts in enumerate(tracer.invokes):
        if not prompts:
            rows[i] = rows[-1]
    # values of the generation as a whole run once (step 0); model.samples and what is
    # computed from it keep their steps and run once per generated step
    nodes = tuple(n if n.id in tracer._stepped else n.model_copy(update={"steps": Steps()})
                  for n in tracer.nodes if n.id in tracer._post)
    graph = ir.Graph(invokes=tracer._graph.invokes if tracer._graph else (), nodes=nodes,
                     tensors=tuple(tracer.tensors))
    state = RunState(env=dict(values), env_step=dict.fromkeys(values, 0))
    runner = GraphRunner(graph, state=state)
    sampled: dict[int, tuple[list[torch.Tensor], list[int]]] = {}
    new_tokens: dict[int, int] = {}
    start = 0
    everyone: tuple[list[torch.Tensor], list[int]] = (list(generated), [])
    for i, prompts in enumerate(tracer.invokes):
        lens = [len(p) for p in prompts]
        sampled[i] = (list(generated[start:start + len(prompts)]), lens)
        everyone[1].extend(lens)
        new_tokens[i] = max((len(r) - n for r, n in zip(*sampled[i], strict=True)),
                            default=0)
        start += len(prompts)
    sampled[-1] = everyone
    for i, prompts in enumerate(tracer.invokes):
        if not prompts:
            sampled[i] = everyone
            new_tokens[i] = max(new_tokens.values(), default=0)
    steps = max(new_tokens.values(), default=0) if tracer._stepped else 1
    for step in range(max(1, steps)):
        for r in values:   # model values the post nodes use are there at every step
            state.env_step[r] = step
        runner.begin_step(step)
        if step == 0:
            runner.on_event(_GeneratedEvent(rows))
        if tracer._stepped:
            runner.on_event(_SampledEvent(step, sampled, pad))
        runner.end_step()
    saves = runner.results()
    for n in nodes:   # a step loop over all steps: one entry per step its invoke ran
        if n.id in saves and n.id in tracer._stepped and isinstance(saves[n.id], list) \
                and (n.steps.stop is None or n.steps.stop - n.steps.start > 1):
            ran = new_tokens.get(n.invoke, steps)
            saves[n.id] = saves[n.id][: max(0, ran - n.steps.start)]
    return saves

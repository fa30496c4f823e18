"""Building the IR graph a backend runs from a trace's recording.

The graph holds the trace's invokes and generation settings, the model's persistent edits
(``model.edit()``) in front of the trace's own nodes, and leaves out the nodes computed from
the generated ids: those run here once generation has ended (see
:mod:`vinterp.tracing.running`, which also maps the results back to the trace's node ids).
Separate from the tracer: built once the recording is complete (or when ``tracer.graph`` is
asked for), it records nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vinterp import ir
from vinterp.ir.schema import Node, Ref, Steps
from vinterp.ir.validate import node_refs
from vinterp.tracing.errors import TracingError
from vinterp.tracing.remap import _remap
from vinterp.tracing.values import ir_value

if TYPE_CHECKING:
    from vinterp.tracing.tracer import Tracer


def build_graph(tracer: Tracer) -> ir.Graph:
    """The graph the backend runs for ``tracer``'s recording (not validated: ``ir.load`` it).

    It also sets ``tracer._device_ids`` and ``tracer._hidden`` (see :func:`_device_nodes`),
    which :func:`vinterp.tracing.running.apply_result` and a later trace of the same session
    (:mod:`vinterp.tracing.values`) read to map the graph's node ids back to the trace's.
    """
    if not any(tracer.invokes):
        raise TracingError("nothing to run: pass a prompt to model.trace(...) or add "
                           "`with tracer.invoke(prompt):` blocks (a prompt-less "
                           "tracer.invoke() works on the batch the others make)")
    # generation settings may add tensor constants: before the edits' tensors, which go last
    invokes = tuple(
        ir.Invoke(prompts=p, generation={
            k: ir_value(tracer, v) for k, v in tracer.invoke_generation.get(i, {}).items()},
            token_inputs=tuple(
                {k: ir_value(tracer, v) for k, v in (given or {}).items()}
                for given in tracer.invoke_token_inputs.get(i, ())))
        for i, p in enumerate(tracer.invokes))
    generation = {k: ir_value(tracer, v) for k, v in tracer.generation.items()}
    edits, edit_tensors = _edit_nodes(tracer)
    return ir.Graph(
        mode="generate" if tracer.mode == "generate" else "trace",
        invokes=invokes,
        nodes=_device_nodes(tracer, edits),
        tensors=tuple(tracer.tensors) + tuple(edit_tensors),
        generation=generation,
    )


def _device_nodes(tracer: Tracer, edits: list[Node]) -> tuple[Node, ...]:
    """The nodes the backend runs: the model's persistent edits (``model.edit()``), then
    all of the trace's but those computed from the generated ids.

    With edits or such nodes the trace's are renumbered densely (``tracer._device_ids``:
    trace id -> graph id), and each model value the generated-ids nodes use gets a save of
    its own so it comes back (``tracer._hidden``: trace id -> that save's graph id).
    """
    out = list(edits)
    if not tracer._post and not out:
        tracer._device_ids = None
        return tuple(tracer.nodes)
    ids: dict[int, int] = {}
    for n in tracer.nodes:
        if n.id in tracer._post:
            continue
        ids[n.id] = len(out)
        out.append(n.model_copy(update={"id": len(out), "args": _remap(n.args, ids),
                                        "kwargs": _remap(n.kwargs, ids)}))
    used = sorted({r for n in tracer.nodes if n.id in tracer._post for r in node_refs(n)
                   if r not in tracer._post})
    tracer._hidden = {}
    for r in used:
        src = tracer.nodes[r]
        tracer._hidden[r] = len(out)
        out.append(Node(id=len(out), op="save", args=(Ref(ref=ids[r]),),
                        invoke=src.invoke, steps=src.steps, line=src.line))
    tracer._device_ids = ids
    return tuple(out)


def _edit_nodes(tracer: Tracer) -> tuple[list[Node], list[ir.TensorData]]:
    """The model's persistent edits as nodes of this graph (one copy per invoke, at every
    step) and their tensors, which go after the trace's own (all of them recorded by now)."""
    from vinterp.tracing.edit import EditTracer   # (a subclass of Tracer: imported here)

    edits = getattr(tracer.lm, "_edits", None)
    tensors: list[ir.TensorData] = []
    if not edits or isinstance(tracer, EditTracer):
        return [], tensors
    out: list[Node] = []
    steps = Steps(start=0, stop=None) if tracer.mode == "generate" else Steps()
    for edit in edits:
        base = len(tracer.tensors) + len(tensors)
        tensors.extend(edit.tensors)
        for i, prompts in enumerate(tracer.invokes):
            if not prompts:
                continue
            ids: dict[int, int] = {}
            for n in edit.nodes:
                ids[n.id] = len(out)
                out.append(n.model_copy(update={
                    "id": len(out), "invoke": i, "steps": steps,
                    "args": _remap(n.args, ids, base),
                    "kwargs": _remap(n.kwargs, ids, base)}))
    return out, tensors

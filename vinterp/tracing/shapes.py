"""Trace-time shapes: a proxy's ``x.shape`` known before the model runs.

A meta pass (the model on the meta device, as ``model.scan``) runs the part of the recording
a value depends on, over the trace's prompts, and every tensor it computes gets its shape
cached on the tracer (see ``Tracer.known_shape``). Separate from the tracer: it runs a copy of
part of the recording as a graph of its own, it records nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from vinterp import ir
from vinterp.ir.schema import Node, Ref, Steps
from vinterp.ir.validate import node_refs
from vinterp.tracing.remap import _remap

if TYPE_CHECKING:
    from vinterp.tracing.tracer import Tracer


class Keys(tuple):
    """The known keys of a mapping value (a module's keyword arguments, ``.inputs[1]``)."""


def known_shape(tracer: Tracer, node_id: int) -> Any:
    """``Tracer.known_shape``: the meta pass over what ``node_id`` depends on, cached in
    ``tracer._shapes``."""
    if node_id in tracer._shapes:
        return tracer._shapes[node_id]
    need: set[int] = set()
    stack = [node_id]
    while stack:
        n = stack.pop()
        if n in need:
            continue
        need.add(n)
        stack.extend(node_refs(tracer.nodes[n]))
    if not tracer.invokes or any(
            n in tracer._post or (tracer.nodes[n].steps.start, tracer.nodes[n].steps.stop)
            != (0, 1) or tracer.nodes[n].op in ("backward", "stop") for n in need):
        tracer._shapes[node_id] = None
        return None
    order = sorted(need)
    ids = {old: new for new, old in enumerate(order)}
    nodes = [tracer.nodes[o].model_copy(update={
        "id": ids[o], "args": _remap(tracer.nodes[o].args, ids),
        "kwargs": _remap(tracer.nodes[o].kwargs, ids), "steps": Steps()}) for o in order]
    for o in order:
        nodes.append(Node(id=len(nodes), op="save", args=(Ref(ref=ids[o]),),
                          invoke=tracer.nodes[o].invoke))
    # a generation's shapes are its first step's (the meta pass runs that step only): HF
    # generate computes the last position's logits there, not the whole prompt's
    graph = ir.Graph(mode="generate" if tracer.mode == "generate" else "trace",
                     invokes=tuple(ir.Invoke(prompts=p) for p in tracer.invokes),
                     nodes=tuple(nodes), tensors=tuple(tracer.tensors))
    try:
        backend = tracer.lm._scan_backend()
        backend.check(graph)
        saves = backend.run(graph).saves
    except Exception:
        tracer._shapes[node_id] = None
        return None
    for o in order:
        v = saves.get(len(order) + ids[o])
        if isinstance(v, torch.Tensor):
            tracer._shapes[o] = v.shape
        elif isinstance(v, (tuple, list)) and not hasattr(v, "keys"):
            tracer._shapes[o] = len(v)
        elif isinstance(v, dict):
            tracer._shapes[o] = Keys(v.keys())
        else:
            tracer._shapes.setdefault(o, None)
    return tracer._shapes.get(node_id)

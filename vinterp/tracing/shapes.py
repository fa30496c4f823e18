"""Trace-time shapes: a proxy's ``x.shape`` known before the model runs.

A meta pass (the model on the meta device, as ``model.scan``) runs the part of the recording
a value depends on, over the trace's prompts, and every tensor it computes gets its shape
cached on the tracer (see ``Tracer.known_shape``). Separate from the tracer: it runs a copy of
part of the recording as a graph of its own, it records nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass(frozen=True)
class Rank:
    """The number of dimensions of a tensor whose sizes are known only when it runs: a value
    of a generation step after the first (its sequence length differs from step to step) or
    of an edit body (recorded over a stand-in prompt). Its rank is the same at every step, so
    ``B, S, H = x.shape`` unpacks into values of the graph. (Not an ``int``: a tuple's
    length is one.)"""

    dims: int


def known_shape(tracer: Tracer, node_id: int, exact: bool = True) -> Any:
    """``Tracer.known_shape``: the meta pass over what ``node_id`` depends on, cached on the
    tracer.

    ``exact``: sizes are known for values of the prompt's forward (step 0). A value of a later
    step, or of a prompt-less invoke (whose batch later invokes still grow), gets its
    structure only, which neither changes: a tensor's ``Rank``, a tuple's length, a mapping's
    ``Keys``. ``exact=False`` gives the structure for every value.
    """
    cache = tracer._shapes if exact else tracer._structures
    if node_id in cache:
        return cache[node_id]
    need: set[int] = set()
    stack = [node_id]
    while stack:
        n = stack.pop()
        if n in need:
            continue
        need.add(n)
        stack.extend(node_refs(tracer.nodes[n]))
    if not tracer.invokes or any(
            n in tracer._post or tracer.nodes[n].op in ("backward", "stop") for n in need):
        cache[node_id] = None
        return None
    # A later step's sizes differ from step to step; a prompt-less invoke's value spans the
    # whole batch, which invokes written after this point still grow: structure only
    if exact and any((tracer.nodes[n].steps.start, tracer.nodes[n].steps.stop) != (0, 1)
                     or _whole_batch(tracer, tracer.nodes[n].invoke) for n in need):
        return known_shape(tracer, node_id, exact=False)
    saves = _meta_pass(tracer, sorted(need))
    for o, v in saves.items():
        if isinstance(v, torch.Tensor):
            cache[o] = v.shape if exact else Rank(v.dim())
        elif isinstance(v, (tuple, list)) and not hasattr(v, "keys"):
            cache[o] = len(v)
        elif isinstance(v, dict):
            cache[o] = Keys(v.keys())
    return cache.setdefault(node_id, None)


def _whole_batch(tracer: Tracer, invoke: int) -> bool:
    """Whether ``invoke`` is a prompt-less ``tracer.invoke()`` (it sees every invoke's rows)."""
    return 0 <= invoke < len(tracer.invokes) and not tracer.invokes[invoke]


def _meta_pass(tracer: Tracer, order: list[int]) -> dict[int, Any]:
    """The values of nodes ``order`` (and what they need) in one forward on the meta device,
    every node as if at the first step; empty when the meta pass cannot run them."""
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
        return {}
    return {o: saves.get(len(order) + ids[o]) for o in order}

"""The vectorized path's planning: which graphs it serves, as per-point actions.

Most requests only steer (``steer``/``scale``/``ablate``/``clamp``/``replace`` at a point, with
position selection) and save module values, whole or at some positions (``x[:, -1]``,
``tracer.cache(positions=...)``: only those rows are copied, see
:class:`~vinterp_vllm.actions.Selection`). :func:`plan_for` recognises such graphs and turns
them into per-point :class:`~vinterp_vllm.actions.Action` lists; what nnsight users write for
the same steering (``x[:] += v`` ...) is recognised too (``idioms.py``). Per-step copies from
``for step in tracer.iter[:]`` merge into one action (:func:`_merge_steps`). Each step,
``groups.py`` runs all requests' actions at a point as one batched tensor op per group.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from vinterp.ir import ops
from vinterp.ir.schema import Graph, ListV, Node, Ref, SliceV, TensorRef, TupleV, Value
from vinterp.ir.tensors import decode_tensor
from vinterp_vllm.actions import FAST_VALUES, Action, ActionList, NotFast, selection
from vinterp_vllm.idioms import Idioms


def _const(graph: Graph, v: Value) -> Any:
    if isinstance(v, Ref):
        raise NotFast
    if isinstance(v, TensorRef):
        return decode_tensor(graph.tensors[v.tensor])
    if isinstance(v, SliceV):
        return slice(*(_const(graph, x) for x in v.slice))
    if isinstance(v, (ListV, TupleV)):
        return [_const(graph, x) for x in (v.list if isinstance(v, ListV) else v.tuple)]
    return v


def _scalar(v: Any) -> float:
    """A factor, scale or bound as one number; a tensor of several (a per-dimension
    ``scale(factor=t)``) is the general path's, which runs the same kernels as HF."""
    if isinstance(v, torch.Tensor) and v.numel() != 1:
        raise NotFast
    return float(v)


def _unit(v: torch.Tensor) -> torch.Tensor:
    norm = v.norm(dim=-1, keepdim=True)
    if bool((norm == 0).any()):
        raise ValueError("direction has zero norm; pass a nonzero direction")
    return v / norm


def _make_action(graph: Graph, node: Node, dtype: torch.dtype) -> Action:
    kw = {k: _const(graph, v) for k, v in node.kwargs.items()}
    stop = float("inf") if node.steps.stop is None else node.steps.stop
    a = Action(node.op, node, node.steps.start, stop, positions=kw.get("positions"))
    a.spec_key = repr(a.positions)
    a.vec_key = repr(sorted((k, v) for k, v in node.kwargs.items() if k != "positions"))
    if node.op == "steer":
        a.vector = _scalar(kw.get("scale", 1.0)) * torch.as_tensor(kw["vector"]).to(dtype)
    elif node.op == "replace":
        a.vector = torch.as_tensor(kw["vector"]).to(dtype)
    elif node.op in ("ablate", "clamp"):
        a.vector = _unit(torch.as_tensor(kw["direction"]).to(dtype))
        if kw.get("min") is not None:
            a.lo = _scalar(kw["min"])
        if kw.get("max") is not None:
            a.hi = _scalar(kw["max"])
    elif node.op == "scale":
        a.factor = _scalar(kw.get("factor", 1.0))
    if a.vector is not None and a.vector.dim() != 1:
        raise NotFast  # per-row vectors: the general path handles (and checks) them
    return a


def plan_for(graph: Graph, invoke: int, point_value: dict[tuple[str, str], str],
             dtype: torch.dtype, *, nodes: list[Node] | None = None
             ) -> dict[tuple[str, str], list[Action]] | None:
    """Per-point actions if ``invoke``'s nodes are steering + captures only, else ``None``.

    ``point_value`` maps each HF point of the graph to its value kind (see ``points.py``).
    ``nodes``: the invoke's nodes (and global ones) when the caller has them grouped already
    (the client checks every invoke of a large graph).
    """
    mine = nodes if nodes is not None else [n for n in graph.nodes if n.invoke in (invoke, -1)]
    alias: dict[int, tuple[str, str]] = {}   # node id → the point whose tensor it is
    items: dict[int, _Item] = {}             # getitem node id → what it selects
    plan: dict[tuple[str, str], list[Action]] = {}
    try:
        idioms = Idioms(graph, invoke, mine, point_value, dtype)
        for n in mine:
            if n.invoke != invoke:
                raise NotFast
            if n.id in idioms.consumed:
                continue
            edit = idioms.edits.get(n.id)
            if edit is not None:    # an idiomatic write (x[:] += v ...) = steering actions
                base, actions = edit
                point = alias[base]
                plan.setdefault(point, []).extend(actions)
                alias[n.id] = point
            elif n.op == "getitem":
                items[n.id] = _item(n, alias, point_value, plan)
            elif n.op == "save" and n.args and isinstance(n.args[0], Ref) \
                    and n.args[0].ref in items:
                plan[items[n.args[0].ref].point].append(
                    _selected_capture(graph, invoke, n, items[n.args[0].ref], plan))
            elif n.op == "read":
                point = (n.kwargs["module"], n.kwargs["kind"])
                if point_value.get(point) not in FAST_VALUES:
                    raise NotFast
                alias[n.id] = point
            elif n.op in ops.STEERING_OPS or n.op in ("save", "write"):
                src = n.args[0] if n.args else None
                if not isinstance(src, Ref) or src.ref not in alias:
                    raise NotFast
                point = alias[src.ref]
                if n.op == "write":
                    if (n.kwargs["module"], n.kwargs["kind"]) != point:
                        raise NotFast
                    alias[n.id] = point
                elif n.op == "save":
                    stop = float("inf") if n.steps.stop is None else n.steps.stop
                    plan.setdefault(point, []).append(
                        Action("capture", n, n.steps.start, stop))
                else:
                    if len(n.args) != 1 or point_value[point] == "attn":
                        raise NotFast  # HF attention is a tuple: the general path explains
                    plan.setdefault(point, []).append(_make_action(graph, n, dtype))
                    alias[n.id] = point
            else:
                raise NotFast
    except (NotFast, KeyError, TypeError):
        return None
    return {point: ActionList(_merge_steps(actions)) for point, actions in plan.items()}


def _signature(a: Action) -> tuple[Any, ...] | None:
    if a.op == "capture" or a.vec_key is None:
        return None
    return (a.op, a.spec_key, a.factor, a.lo, a.hi, a.vec_key)


def _merge_steps(actions: list[Action]) -> list[Action]:
    """Per-step copies of the same actions (``for step in tracer.iter[:]``) as one run of steps.

    Blocks are runs of consecutive actions with the same steps; two adjacent blocks merge when
    their steps are contiguous and their steering actions equal one by one (so each step sees
    the same actions in the same order). Without this a 64-step loop would give 64 slots per
    point, each visited for every request at every step.
    """
    blocks: list[list[Action]] = []
    for a in actions:
        if blocks and (blocks[-1][0].start, blocks[-1][0].stop) == (a.start, a.stop):
            blocks[-1].append(a)
        else:
            blocks.append([a])
    if len(blocks) < 2:
        return actions
    out: list[list[Action]] = []
    for b in blocks:
        prev = out[-1] if out else None
        if prev is not None and prev[0].stop == b[0].start and len(prev) == len(b) and all(
                _signature(x) is not None and _signature(x) == _signature(y)
                for x, y in zip(prev, b, strict=True)):
            out[-1] = [replace(x, stop=b[0].stop) for x in prev]
        else:
            out.append(b)
    return [a for b in out for a in b]


@dataclass(frozen=True)
class _Item:
    """A ``getitem`` of a point's value, as seen by :func:`plan_for`."""

    node: Node
    point: tuple[str, str]
    edits_before: int          # the point's edit count then: no edit may come in between


def _item(n: Node, alias: dict[int, tuple[str, str]],
          point_value: dict[tuple[str, str], str],
          plan: dict[tuple[str, str], list[Action]]) -> _Item:
    """A ``getitem`` directly on a point's (possibly steered) value; else :class:`NotFast`."""
    src = n.args[0] if len(n.args) == 2 else None
    if not isinstance(src, Ref) or src.ref not in alias:
        raise NotFast
    point = alias[src.ref]
    if point_value[point] == "attn":
        raise NotFast  # HF attention is a tuple: indexing it is the general path's business
    return _Item(n, point, _edits(plan.setdefault(point, []), n))


def _edits(actions: list[Action], at: Node) -> int:
    """How many of a point's actions change its value at ``at``'s steps. Captures do not,
    nor do edits of other steps: ``tracer.all()`` with ``steps.append(x[:, -1])`` records
    every step's read and edit before the list's saves."""
    stop = float("inf") if at.steps.stop is None else at.steps.stop
    return sum(a.op != "capture" and a.start < stop and at.steps.start < a.stop
               for a in actions)


def _selected_capture(graph: Graph, invoke: int, save: Node, item: _Item,
                      plan: dict[tuple[str, str], list[Action]]) -> Action:
    """The capture action of ``save(x[:, positions])``; else :class:`NotFast`.

    The key's indexing is a view in HF, so an edit of ``x`` between the ``getitem`` and the
    ``save`` would show in the saved value: such graphs keep the general path.
    """
    if _edits(plan[item.point], item.node) != item.edits_before \
            or save.steps != item.node.steps:
        raise NotFast
    prompts = graph.invokes[invoke].prompts
    if len(prompts) != 1:
        raise NotFast
    stop = float("inf") if save.steps.stop is None else save.steps.stop
    decodes = graph.mode != "trace" and stop > 1
    a = Action("capture", save, save.steps.start, stop)
    a.select = selection(item.node.args[1], len(prompts[0]), save.steps.start == 0, decodes)
    # (the rows a selection captures depend on these two only; shaping is per action)
    a.spec_key = (a.select.prompt_index, bool(a.select.decode_index))
    return a

"""The vectorized path: steering ops and plain captures for every request of a step at once.

Most requests only steer (``steer``/``scale``/``ablate``/``clamp``/``replace`` at a point, with
position selection) and save module values. :func:`plan_for` recognises such graphs and turns
them into per-point :class:`Action` lists. Each step, :class:`StepGroups` gathers all requests'
actions at a point into groups (one per op and slot): the rows to touch and, per row, an index
into a table of this step's vectors — like vLLM's LoRA token mapping. A hook then runs one
batched tensor op per group, with no loop over requests and no limit on distinct vectors.

The math is :mod:`vinterp.steering.kernels`' (same order of float operations), so the results
equal the HF backend's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from vinterp.ir import ops
from vinterp.ir.schema import Graph, ListV, Node, Ref, SliceV, TensorRef, TupleV, Value
from vinterp.ir.tensors import decode_tensor
from vinterp.steering.kernels import position_mask
from vinterp_vllm.layout import RowSpan

#: points whose value is one plain [rows, hidden] tensor (fast path can serve them)
FAST_VALUES = frozenset({"residual", "tensor", "norm", "attn"})


@dataclass
class Action:
    """One steering op or capture at a point, in program order."""

    op: str                      # a steering op, or "capture"
    node: Node
    start: int                   # steps [start, stop)
    stop: float
    positions: Any = None
    vector: torch.Tensor | None = None    # steer: scale * v; replace: v; ablate/clamp: unit d
    factor: float = 1.0
    lo: float = float("-inf")
    hi: float = float("inf")
    spec_key: str = ""

    def wants_step(self, step: int) -> bool:
        return self.start <= step < self.stop


def _const(graph: Graph, v: Value) -> Any:
    if isinstance(v, Ref):
        raise _NotFast
    if isinstance(v, TensorRef):
        return decode_tensor(graph.tensors[v.tensor])
    if isinstance(v, SliceV):
        return slice(*(_const(graph, x) for x in v.slice))
    if isinstance(v, (ListV, TupleV)):
        return [_const(graph, x) for x in (v.list if isinstance(v, ListV) else v.tuple)]
    return v


class _NotFast(Exception):  # noqa: N818 - control flow
    pass


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
    if node.op == "steer":
        a.vector = float(kw.get("scale", 1.0)) * torch.as_tensor(kw["vector"]).to(dtype)
    elif node.op == "replace":
        a.vector = torch.as_tensor(kw["vector"]).to(dtype)
    elif node.op in ("ablate", "clamp"):
        a.vector = _unit(torch.as_tensor(kw["direction"]).to(dtype))
        if kw.get("min") is not None:
            a.lo = float(kw["min"])
        if kw.get("max") is not None:
            a.hi = float(kw["max"])
    elif node.op == "scale":
        a.factor = float(kw.get("factor", 1.0))
    if a.vector is not None and a.vector.dim() != 1:
        raise _NotFast  # per-row vectors: the general path handles (and checks) them
    return a


def plan_for(graph: Graph, invoke: int, point_value: dict[tuple[str, str], str],
             dtype: torch.dtype) -> dict[tuple[str, str], list[Action]] | None:
    """Per-point actions if ``invoke``'s nodes are steering + captures only, else ``None``.

    ``point_value`` maps each HF point of the graph to its value kind (see ``points.py``).
    """
    mine = [n for n in graph.nodes if n.invoke in (invoke, -1)]
    alias: dict[int, tuple[str, str]] = {}   # node id → the point whose tensor it is
    plan: dict[tuple[str, str], list[Action]] = {}
    try:
        for n in mine:
            if n.invoke != invoke:
                raise _NotFast
            if n.op == "read":
                point = (n.kwargs["module"], n.kwargs["kind"])
                if point_value.get(point) not in FAST_VALUES:
                    raise _NotFast
                alias[n.id] = point
            elif n.op in ops.STEERING_OPS or n.op in ("save", "write"):
                src = n.args[0] if n.args else None
                if not isinstance(src, Ref) or src.ref not in alias:
                    raise _NotFast
                point = alias[src.ref]
                if n.op == "write":
                    if (n.kwargs["module"], n.kwargs["kind"]) != point:
                        raise _NotFast
                    alias[n.id] = point
                elif n.op == "save":
                    stop = float("inf") if n.steps.stop is None else n.steps.stop
                    plan.setdefault(point, []).append(
                        Action("capture", n, n.steps.start, stop))
                else:
                    if len(n.args) != 1 or point_value[point] == "attn":
                        raise _NotFast  # HF attention is a tuple: the general path explains
                    plan.setdefault(point, []).append(_make_action(graph, n, dtype))
                    alias[n.id] = point
            else:
                raise _NotFast
    except (_NotFast, KeyError, TypeError):
        return None
    # a value used after it was saved must not be an alias read later at another step
    return plan


def _row_mask(a: Action, span: RowSpan, cache: dict[tuple[Any, ...], list[int]]) -> list[int]:
    """Batch row indices of ``span`` that action ``a`` touches this step (memoized per step)."""
    key = (a.spec_key, a.start, a.stop)
    hit = cache.get(key)
    if hit is not None:
        return hit
    steps = span.steps()
    pos = span.positions()
    ok = torch.tensor([a.wants_step(s) for s in steps], dtype=torch.bool)
    if a.op != "capture":
        m = position_mask(a.positions, pos, span.prompt_len)
        if m is not None:
            ok &= m
    rows = (torch.nonzero(ok).flatten() + span.start).tolist()
    cache[key] = rows
    return rows


@dataclass
class Group:
    """One op over many requests' rows at one point: ``rows`` and each row's table index."""

    op: str
    rows: torch.Tensor
    table_index: torch.Tensor
    table: torch.Tensor | None = None        # [k, hidden] vectors (steer/replace/ablate/clamp)
    factor: torch.Tensor | None = None       # [k] (scale)
    lo: torch.Tensor | None = None           # [k] (clamp)
    hi: torch.Tensor | None = None
    #: capture groups: (request state, action, its span, its batch rows) per owner
    captures: list[tuple[Any, Action, RowSpan, list[int]]] = field(default_factory=list)
    #: the request states whose rows this group touches (to fail them if it fails)
    owners: list[Any] = field(default_factory=list)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The new values of ``x`` (this group's rows, ``[R, hidden]``)."""
        if self.op == "steer":
            return x + self.table[self.table_index].to(x.dtype)  # type: ignore[index]
        if self.op == "scale":
            return x * self.factor[self.table_index].unsqueeze(-1).to(x.dtype)  # type: ignore
        if self.op == "replace":
            return self.table[self.table_index].to(x.dtype)   # type: ignore[index]
        d = self.table[self.table_index].to(x.dtype)          # type: ignore[index]
        proj = (x * d).sum(-1, keepdim=True)
        if self.op == "ablate":
            return x - proj * d
        hi = self.hi[self.table_index].unsqueeze(-1).to(x.dtype)  # type: ignore[index]
        lo = self.lo[self.table_index].unsqueeze(-1).to(x.dtype)  # type: ignore[index]
        clamped = torch.maximum(torch.minimum(proj, hi), lo)
        return x + (clamped - proj) * d


def build_groups(entries: list[tuple[Any, RowSpan, list[Action]]],
                 device: torch.device) -> list[Group]:
    """Groups for one point this step; ``entries`` = (request state, its rows, its actions).

    Actions of one request run in order; the k-th actions of all requests form slot k, and
    within a slot requests touch disjoint rows, so each (slot, op) is one batched op.
    """
    groups: list[Group] = []
    slot = 0
    while True:
        by_op: dict[str, tuple[list[int], list[int], list[Action], list[Any]]] = {}
        any_left = False
        for state, span, actions in entries:
            if slot >= len(actions):
                continue
            any_left = True
            a = actions[slot]
            rows = _row_mask(a, span, state.mask_cache)
            if not rows:
                continue
            bucket = by_op.setdefault(a.op, ([], [], [], []))
            k = len(bucket[2])
            bucket[0].extend(rows)
            bucket[1].extend([k] * len(rows))
            bucket[2].append(a)
            bucket[3].append((state, span, rows))
        if not any_left:
            return groups
        for op, (rows, tidx, acts, owners) in by_op.items():
            g = Group(op, torch.tensor(rows, device=device), torch.tensor(tidx, device=device),
                      owners=[o[0] for o in owners])
            if op == "capture":
                g.captures = [(st, a, sp, r) for (st, sp, r), a in zip(owners, acts, strict=True)]
            elif op == "scale":
                g.factor = torch.tensor([a.factor for a in acts], device=device)
            else:
                g.table = torch.stack([a.vector for a in acts]).to(device)  # type: ignore[misc]
                if op == "clamp":
                    g.lo = torch.tensor([a.lo for a in acts], device=device)
                    g.hi = torch.tensor([a.hi for a in acts], device=device)
            groups.append(g)
        slot += 1

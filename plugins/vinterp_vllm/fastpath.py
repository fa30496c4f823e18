"""The vectorized path: steering ops and plain captures for every request of a step at once.

Most requests only steer (``steer``/``scale``/``ablate``/``clamp``/``replace`` at a point, with
position selection) and save module values, whole or at some positions (``x[:, -1]``,
``tracer.cache(positions=...)``: only those rows are copied, see :class:`Selection`).
:func:`plan_for` recognises such graphs and turns them into per-point :class:`Action` lists.
Each step, :func:`build_groups` gathers all requests' actions at a point into groups (one per
op and slot): the rows to touch and, per row, an index into a table of this step's vectors —
like vLLM's LoRA token mapping. A hook then runs one batched tensor op per group, with no loop
over requests and no limit on distinct vectors.
The groups' device tensors are shared by all points of a step and reused by the next step when
the batch is unchanged (:class:`TensorCache`).

The math is :mod:`vinterp.steering.kernels`' (same order of float operations), so the results
equal the HF backend's.

What nnsight users write is recognised too (:class:`_Idioms`): ``x[:] += v``,
``x[:, -1] += v``, ``x[:, idx] += v``, ``x[:] = x + v``, ``x += v`` (steer), ``x[:] *= s``
(scale) and ``x[:] = x - (x @ d)[..., None] * d`` (ablate along ``d`` as given), at any
steps; per-step copies from ``for step in tracer.iter[:]`` merge into one action
(:func:`_merge_steps`). Steer and scale idioms are the shortcuts' float ops exactly (``v`` cast
to the value's dtype first, as ``.steer`` does: a float64 ``v`` on a float32 model differs from
HF by one rounding); the ablation's projection sums ``x * d`` where HF's ``x @ d`` may sum in
another order (~1e-7 relative in float32).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

import torch

from vinterp.ir import ops
from vinterp.ir.schema import (
    EllipsisV,
    Graph,
    ListV,
    Node,
    Ref,
    SliceV,
    TensorRef,
    TupleV,
    Value,
)
from vinterp.ir.tensors import decode_tensor
from vinterp.ir.validate import node_refs
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
    spec_key: Any = ""                    # which rows it touches, as a hashable key
    select: Selection | None = None       # capture of ``x[:, positions]`` only
    #: where ``vector`` came from (constant index, scale...), to merge per-step copies cheaply
    vec_key: Any = None

    def wants_step(self, step: int) -> bool:
        return self.start <= step < self.stop

    def assemble(self, step: int, chunks: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
        """The saved value at ``step`` from its captured ``(position, row)`` chunks, HF-shaped."""
        if len(chunks) == 1:   # x[:, -1] and decode steps: a view (the row is a copy already)
            rows = chunks[0][1][None, None]
        else:
            rows = torch.stack([v for _, v in chunks]).unsqueeze(0)   # [1, m, hidden]
        if self.select is None:
            return rows
        return self.select.shape(step, [p for p, _ in chunks], rows)


@dataclass(frozen=True)
class Selection:
    """A position-selecting key ``x[d0, seq, *rest]`` resolved for one request.

    ``d0`` is ``slice(None)`` (keeps the batch dim) or ``0`` (drops it); ``seq`` an int
    (drops the sequence dim) or a list/slice. At step 0 the value is the whole prompt, at a
    decode step one row, so ``seq`` is resolved against those lengths once, at plan time:
    ``prompt_index`` / ``decode_index`` are the selected local rows in key order.
    """

    d0: Any
    drops_seq: bool
    rest: tuple[Any, ...]
    prompt_index: tuple[int, ...]
    decode_index: tuple[int, ...]
    prompt_set: frozenset[int] = field(default=frozenset())

    def wants(self, pos: int, prompt_len: int) -> bool:
        """Whether the row at absolute position ``pos`` is selected at its step."""
        if pos < prompt_len:
            return pos in self.prompt_set
        return bool(self.decode_index)

    def shape(self, step: int, positions: list[int], rows: torch.Tensor) -> torch.Tensor:
        """``rows`` (``[1, m, hidden]``, the selected rows in position order) indexed by the key."""
        wanted = self.prompt_index if step == 0 else self.decode_index
        if step == 0:
            at = {p: i for i, p in enumerate(positions)}
            local: list[int] = [at[p] for p in wanted]
        else:
            local = [0] * len(wanted)
        idx: Any = local[0] if self.drops_seq else local
        return rows[(self.d0, idx, *self.rest)]


def _is_full_slice(v: Value) -> bool:
    return isinstance(v, SliceV) and all(x is None for x in v.slice)


def _is_int(v: Value) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _selection(key: Value, prompt_len: int, prompt: bool, decodes: bool) -> Selection:
    """The :class:`Selection` of a ``getitem`` key, or :class:`_NotFast` if it is not one.

    Resolved once per distinct key (a request saving ``x[:, -1]`` at 30 layers has 30 equal
    keys). Only keys of ints, ``None`` and ``...`` are cached: IR values compare by value, and
    ``True == 1`` and ``1.0 == 1`` must not share an entry.
    """
    if not _ints_only(key):
        raise _NotFast
    return _resolve_selection(key, prompt_len, prompt, decodes)


def _ints_only(v: Value) -> bool:
    t = type(v)
    if t is int or v is None or t is EllipsisV:
        return True
    if t is TupleV:
        return all(_ints_only(x) for x in v.tuple)  # type: ignore[union-attr]
    if t is ListV:
        return all(_ints_only(x) for x in v.list)  # type: ignore[union-attr]
    if t is SliceV:
        return all(_ints_only(x) for x in v.slice)  # type: ignore[union-attr]
    return False


@lru_cache(maxsize=4096)
def _resolve_selection(key: Value, prompt_len: int, prompt: bool, decodes: bool) -> Selection:
    """Uncached :func:`_selection` (keys already checked by ``_ints_only``).

    Accepted: ``(d0, seq)`` or ``(d0, seq, :|...)`` with ``d0`` ``:`` or ``0`` and ``seq`` an
    int, a list of ints or a slice of ints. ``prompt`` / ``decodes``: the save runs at step 0 /
    at decode steps.
    Keys that would raise or select nothing in HF go to the general path (which reproduces HF).
    """
    if not isinstance(key, TupleV) or len(key.tuple) not in (2, 3):
        raise _NotFast
    d0v, seqv, *restv = key.tuple
    if _is_full_slice(d0v):
        d0: Any = slice(None)
    elif _is_int(d0v) and d0v == 0:
        d0 = 0
    else:
        raise _NotFast
    if restv and not (_is_full_slice(restv[0]) or isinstance(restv[0], EllipsisV)):
        raise _NotFast
    rest = (slice(None),) if restv else ()
    if _is_int(seqv):
        seq: Any = seqv
    elif isinstance(seqv, ListV) and seqv.list and all(_is_int(x) for x in seqv.list):
        seq = list(seqv.list)
    elif isinstance(seqv, SliceV) and all(x is None or _is_int(x) for x in seqv.slice):
        seq = slice(*seqv.slice)  # type: ignore[misc]
    else:
        raise _NotFast

    def resolve(n: int) -> tuple[int, ...]:
        # torch's indexing rules on range(n) (plain Python: this runs per request and save)
        rows = range(n)
        try:
            if isinstance(seq, int):
                return (rows[seq],)
            if isinstance(seq, slice):
                if seq.step is not None and seq.step <= 0:
                    raise _NotFast  # torch refuses non-positive slice steps: the general path
                return tuple(rows[seq])
            return tuple(rows[i] for i in seq)
        except IndexError as exc:
            raise _NotFast from exc

    prompt_index = resolve(prompt_len) if prompt else ()
    decode_index = resolve(1) if decodes else ()
    if (prompt and not prompt_index) or (decodes and not decode_index):
        raise _NotFast
    return Selection(d0, _is_int(seqv), rest, prompt_index, decode_index,
                     frozenset(prompt_index))


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
    a.vec_key = repr(sorted((k, v) for k, v in node.kwargs.items() if k != "positions"))
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
        idioms = _Idioms(graph, invoke, mine, point_value, dtype)
        for n in mine:
            if n.invoke != invoke:
                raise _NotFast
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
    return {point: _merge_steps(actions) for point, actions in plan.items()}


# ---------------------------------------------------------------------------- idioms
#
# What nnsight users write for steering, recognised as the shortcuts' actions (same math):
#   x[K] += v, x[K] -= v, x[K] = x[K] + v, x[:] = x + v, x += v (a module's output written
#   back, or edited in place), x[:] *= s, x[:] = x * s, and the ablation
#   x[:] = x - (x @ d)[..., None] * d (also ``x[:] -= ...``, ``.unsqueeze(-1)``).
# K: ``:``, ``...``, or ``(:|0, seq[, :|...])`` with seq an int, a list of ints or a slice
# (the rows ``x[:, seq]`` selects: prompt positions at step 0, the one row at decode steps).
# Anything else (another operand, another layer's value, an extra op, a key that selects
# nothing) is left alone and fails the plan: the graph runs on the general path.

#: in-place ops of the idioms and the out-of-place op each one mirrors
_INPLACE = {"iadd": "add", "isub": "sub", "imul": "mul"}
_EDIT_VALUES = FAST_VALUES - {"attn"}     # HF attention is a tuple: its edits stay general
_LAST_DIM = TupleV(tuple=(EllipsisV(ellipsis=True), None))


class _Idioms:
    """The idiomatic writes of one invoke's nodes, as steering actions.

    ``edits``: node id of the edit (``setitem``, ``write`` or in-place op) → (node id of the
    point value it edits, its actions); ``consumed``: the nodes computing the written value,
    which the plan skips. Each consumed node has one use (inside the idiom), runs at the
    edit's steps, and sits right before the edit (reads aside), so nothing else can see
    or change the values in between.
    """

    def __init__(self, graph: Graph, invoke: int, mine: list[Node],
                 point_value: dict[tuple[str, str], str], dtype: torch.dtype) -> None:
        self.graph, self.dtype, self.mine = graph, dtype, mine
        self.point_value = point_value
        self.by_id = {n.id: n for n in mine}
        self.pos = {n.id: i for i, n in enumerate(mine)}
        self.uses: dict[int, int] = {}
        self.points: dict[int, tuple[str, str]] = {}   # point values: reads and their edits
        self.consumed: set[int] = set()
        self.edits: dict[int, tuple[int, list[Action]]] = {}
        self._tensors: dict[Any, torch.Tensor] = {}   # decoded constants (a loop repeats them)
        prompts = graph.invokes[invoke].prompts if 0 <= invoke < len(graph.invokes) else ()
        self.prompt_len = len(prompts[0]) if len(prompts) == 1 else None
        candidates = False
        for n in mine:
            for r in node_refs(n):
                self.uses[r] = self.uses.get(r, 0) + 1
            if n.op == "read":
                point = (n.kwargs["module"], n.kwargs["kind"])
                if point_value.get(point) in _EDIT_VALUES:
                    self.points[n.id] = point
            elif n.op in ("setitem", "write") or n.op in _INPLACE or n.op in ops.STEERING_OPS:
                candidates = candidates or n.op not in ops.STEERING_OPS
                src = n.args[0] if n.args else None
                if n.op != "write" and isinstance(src, Ref) and src.ref in self.points:
                    self.points[n.id] = self.points[src.ref]
        if not candidates:
            return
        for n in mine:
            if n.op in ("setitem", "write"):
                self._take(n, self._assign(n))
        for n in mine:     # x += v on a module's value, not written back: an edit in place
            if n.op in _INPLACE and n.id not in self.consumed:
                self._take(n, self._in_place(n))

    # ------------------------------------------------------------------ bookkeeping
    def _take(self, edit: Node, found: tuple[int, list[Action], set[int]] | None) -> None:
        if found is None:
            return
        base, actions, used = found
        if any(self.uses.get(u) != 1 or self.by_id[u].steps != edit.steps for u in used):
            return
        span = [self.pos[u] for u in used] + [self.pos[edit.id]]
        for n in self.mine[min(span):max(span) + 1]:
            if n.id != edit.id and n.id not in used and n.op != "read":
                return
        self.consumed |= used
        self.edits[edit.id] = (base, actions)

    def _tensor(self, idx: int, neg: bool = False) -> torch.Tensor:
        """Constant ``idx`` decoded (as the model's dtype and negated, when asked)."""
        key = (idx, neg)
        hit = self._tensors.get(key)
        if hit is None:
            if neg:
                hit = -self._tensor(idx)
            else:
                hit = decode_tensor(self.graph.tensors[idx])
            self._tensors[key] = hit
        return hit

    def _node(self, v: Value) -> Node:
        if not isinstance(v, Ref):
            raise _NotFast
        return self.by_id[v.ref]

    def _point(self, v: Value, edit: Node) -> tuple[str, str]:
        """The point whose value ``v`` is, read at ``edit``'s steps; else :class:`_NotFast`."""
        n = self._node(v)
        if n.id not in self.points or n.steps != edit.steps:
            raise _NotFast
        return self.points[n.id]

    # ------------------------------------------------------------------ matchers
    def _assign(self, e: Node) -> tuple[int, list[Action], set[int]] | None:
        """``x[K] = <x[K] op c>`` / ``x[K] op= c`` (setitem) or ``x = x op c`` (write)."""
        try:
            if e.op == "setitem":
                target, key, value = e.args
                point = self._point(target, e)
                base = target.ref  # type: ignore[union-attr]
            else:
                if len(e.args) != 1:
                    return None
                point, key = (e.kwargs["module"], e.kwargs["kind"]), None
                if self.point_value.get(point) not in _EDIT_VALUES:
                    return None
                value, base = e.args[0], -1
            v = self._node(value)
            used = {v.id}
            if v.op in _INPLACE:
                op, (x, c) = _INPLACE[v.op], v.args
                xn = self._node(x)
                if e.op == "setitem":   # x[K] op= c: getitem, in-place op, setitem
                    if xn.op != "getitem" or xn.args != (target, key):
                        return None
                    used.add(xn.id)
                elif self._point(x, e) != point:
                    return None
            elif v.op in ("add", "sub", "mul") and len(v.args) == 2:
                op = v.op
                a, b = v.args
                if self._selects(a, point, key, e, used):
                    c = b
                elif op != "sub" and self._selects(b, point, key, e, used):
                    c = a
                else:
                    return None
            else:
                return None
            if base < 0:    # a write: the value it edits is the operand's point value
                base = self._base(v, point, e)
            return base, self._actions(op, c, key, e, point, used), used
        except (_NotFast, KeyError, TypeError, ValueError, IndexError):
            return None

    def _in_place(self, e: Node) -> tuple[int, list[Action], set[int]] | None:
        """``x op= c`` on a module's value (edits it in place; nothing written back)."""
        try:
            point = self._point(e.args[0], e)
            used: set[int] = set()
            return (e.args[0].ref,  # type: ignore[union-attr]
                    self._actions(_INPLACE[e.op], e.args[1], None, e, point, used), used)
        except (_NotFast, KeyError, TypeError, ValueError, IndexError):
            return None

    def _base(self, v: Node, point: tuple[str, str], e: Node) -> int:
        for arg in v.args:
            if isinstance(arg, Ref) and arg.ref in self.points \
                    and self._point(arg, e) == point:
                return arg.ref
        raise _NotFast

    def _selects(self, v: Value, point: tuple[str, str], key: Value, e: Node,
                 used: set[int]) -> bool:
        """Whether ``v`` is ``x[K]`` (or ``x`` itself for a whole-value key) of ``point``."""
        if not isinstance(v, Ref) or v.ref not in self.by_id:
            return False
        n = self.by_id[v.ref]
        if n.op == "getitem" and len(n.args) == 2 and n.args[1] == key \
                and n.id not in self.points and self._point(n.args[0], e) == point:
            used.add(n.id)
            return True
        return _whole(key) and n.id in self.points and self._point(v, e) == point

    def _ablation(self, v: Value, point: tuple[str, str], e: Node,
                  used: set[int]) -> int | None:
        """The constant index of ``d`` in ``(x @ d)[..., None] * d``.

        Also ``.unsqueeze(-1)`` for ``[..., None]``, and either factor order.
        """
        if not isinstance(v, Ref):
            return None
        m = self._node(v)
        if m.op != "mul" or len(m.args) != 2:
            return None
        d, p = m.args if isinstance(m.args[0], TensorRef) else m.args[::-1]
        if not isinstance(d, TensorRef):
            return None
        pn = self._node(p)
        if pn.op == "getitem" and len(pn.args) == 2 and pn.args[1] == _LAST_DIM:
            pass
        elif not (pn.op == "method" and pn.kwargs == {"name": "unsqueeze"}
                  and pn.args[1:] == (-1,)):
            return None
        mm = self._node(pn.args[0])
        if mm.op != "matmul" or len(mm.args) != 2 or self._point(mm.args[0], e) != point:
            return None
        d2 = mm.args[1]
        if not isinstance(d2, TensorRef):
            return None
        dv = self._tensor(d.tensor)
        if d2.tensor != d.tensor and not torch.equal(dv, self._tensor(d2.tensor)):
            return None
        if dv.dim() != 1 or not dv.is_floating_point():
            return None
        used |= {m.id, pn.id, mm.id}
        return d.tensor

    def _actions(self, op: str, c: Value, key: Value, e: Node, point: tuple[str, str],
                 used: set[int]) -> list[Action]:
        """The steering actions of ``x[K] = x[K] <op> c`` at ``e``'s steps."""
        dims = _key_dims(key)
        if op == "mul":
            factor = _scalar(self.graph, c)
            return self._spans("scale", key, e, factor=factor, vec_key=factor)
        if op == "sub" and _whole(key):
            d = self._ablation(c, point, e, used)
            if d is not None:   # x - (x @ d)[..., None] * d: ablate along d as given
                return self._spans("ablate", key, e, vector=self._vector(d, False),
                                   vec_key=("d", d))
        if not isinstance(c, TensorRef):
            raise _NotFast
        v = self._tensor(c.tensor)
        if not v.is_floating_point() or v.dim() > dims or v.dim() == 0:
            raise _NotFast
        if v.dim() != 1 and any(n != 1 for n in v.shape[:-1]):
            raise _NotFast    # per-row vectors: the general path
        if v.shape[-1] == 1:
            raise _NotFast    # broadcast over the hidden dim (legal in torch, not a steer)
        # x - v == x + (-v) exactly (negation is exact); as the model's dtype, like .steer()
        vec = self._vector(c.tensor, op == "sub")
        return self._spans("steer", key, e, vector=vec, vec_key=(op, c.tensor))

    def _vector(self, idx: int, neg: bool) -> torch.Tensor:
        key = ("vector", idx, neg)
        hit = self._tensors.get(key)
        if hit is None:
            v = self._tensor(idx, neg)
            hit = self._tensors[key] = v.reshape(v.shape[-1]).to(self.dtype)
        return hit

    def _spans(self, op: str, key: Value, e: Node, **kw: Any) -> list[Action]:
        """One action per run of steps whose rows ``x[K]`` selects alike."""
        start = e.steps.start
        stop = float("inf") if e.steps.stop is None else e.steps.stop
        if _whole(key):
            runs: list[tuple[int, float, Any]] = [(start, stop, None)]
        else:
            if self.prompt_len is None:
                raise _NotFast
            sel = _selection(key, self.prompt_len, start == 0,
                             self.graph.mode != "trace" and stop > 1)
            runs = []
            if start == 0:      # the prompt: the key's rows are prompt positions
                runs.append((0, 1, list(sel.prompt_index)))
            if sel.decode_index:  # a decode step: its one row (the key selects it)
                runs.append((max(start, 1), stop, None))
        out = []
        for a, b, positions in runs:
            act = Action(op, e, a, b, positions=positions, **kw)
            act.spec_key = repr(positions)
            out.append(act)
        return out


def _whole(key: Value) -> bool:
    """``None`` (no key), ``:``, ``...`` or a tuple of those: every row of the value."""
    if key is None or _is_full_slice(key) or isinstance(key, EllipsisV):
        return True
    return isinstance(key, TupleV) and 0 < len(key.tuple) <= 3 and all(
        _is_full_slice(k) or isinstance(k, EllipsisV) for k in key.tuple)


def _key_dims(key: Value) -> int:
    """Dimensions of ``x[key]`` for a ``[batch, seq, hidden]`` value (keys ``_selection`` takes)."""
    if _whole(key) or not isinstance(key, TupleV):
        return 3
    return 3 - sum(1 for k in key.tuple[:2] if _is_int(k))


def _scalar(graph: Graph, c: Value) -> float:
    if isinstance(c, bool):
        raise _NotFast
    if isinstance(c, (int, float)):
        return float(c)
    if isinstance(c, TensorRef):
        t = decode_tensor(graph.tensors[c.tensor])
        if t.dim() == 0 and t.dtype != torch.bool:
            return float(t)
    raise _NotFast


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
    actions_before: int        # the point's action count then: no edit may come in between


def _item(n: Node, alias: dict[int, tuple[str, str]],
          point_value: dict[tuple[str, str], str],
          plan: dict[tuple[str, str], list[Action]]) -> _Item:
    """A ``getitem`` directly on a point's (possibly steered) value; else :class:`_NotFast`."""
    src = n.args[0] if len(n.args) == 2 else None
    if not isinstance(src, Ref) or src.ref not in alias:
        raise _NotFast
    point = alias[src.ref]
    if point_value[point] == "attn":
        raise _NotFast  # HF attention is a tuple: indexing it is the general path's business
    return _Item(n, point, len(plan.setdefault(point, [])))


def _selected_capture(graph: Graph, invoke: int, save: Node, item: _Item,
                      plan: dict[tuple[str, str], list[Action]]) -> Action:
    """The capture action of ``save(x[:, positions])``; else :class:`_NotFast`.

    The key's indexing is a view in HF, so an edit of ``x`` between the ``getitem`` and the
    ``save`` would show in the saved value: such graphs keep the general path.
    """
    if len(plan[item.point]) != item.actions_before or save.steps != item.node.steps:
        raise _NotFast
    prompts = graph.invokes[invoke].prompts
    if len(prompts) != 1:
        raise _NotFast
    stop = float("inf") if save.steps.stop is None else save.steps.stop
    decodes = graph.mode != "trace" and stop > 1
    a = Action("capture", save, save.steps.start, stop)
    a.select = _selection(item.node.args[1], len(prompts[0]), save.steps.start == 0, decodes)
    # (the rows a selection captures depend on these two only; shaping is per action)
    a.spec_key = (a.select.prompt_index, bool(a.select.decode_index))
    return a


def row_mask(a: Action, span: RowSpan, cache: dict[tuple[Any, ...], list[int]]) -> list[int]:
    """Batch row indices of ``span`` that action ``a`` touches this step (memoized per step)."""
    key = (a.spec_key, a.start, a.stop)
    hit = cache.get(key)
    if hit is not None:
        return hit
    # plain Python: a decode step has one row per request, where torch ops cost more than
    # the work; only position masks (steering with positions=) go through the kernels' rule
    ok = [a.wants_step(s) for s in span.steps()]
    if a.select is not None:  # x[:, positions]: only the selected rows are copied
        ok = [w and a.select.wants(p, span.prompt_len)
              for w, p in zip(ok, range(span.first_pos, span.last_pos + 1), strict=True)]
    if a.op != "capture" and a.positions is not None:
        m = position_mask(a.positions, span.positions(), span.prompt_len)
        if m is not None:
            ok = [w and bool(x) for w, x in zip(ok, m.tolist(), strict=True)]
    rows = [span.start + i for i, w in enumerate(ok) if w]
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
    #: ``rows`` as a slice when they are consecutive (views instead of gathers/scatters)
    span: slice | None = None
    #: one row per table entry, in order (decode steps): ``table`` needs no gather
    identity: bool = False

    def _rows_of(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.identity else t[self.table_index]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The new values of ``x`` (this group's rows, ``[R, hidden]``)."""
        if self.op == "steer":
            return x + self._rows_of(self.table).to(x.dtype)  # type: ignore[arg-type]
        if self.op == "scale":
            return x * self._rows_of(self.factor).unsqueeze(-1).to(x.dtype)  # type: ignore
        if self.op == "replace":
            return self._rows_of(self.table).to(x.dtype)   # type: ignore[arg-type]
        d = self._rows_of(self.table).to(x.dtype)          # type: ignore[arg-type]
        proj = (x * d).sum(-1, keepdim=True)
        if self.op == "ablate":
            return x - proj * d
        hi = self._rows_of(self.hi).unsqueeze(-1).to(x.dtype)  # type: ignore[arg-type]
        lo = self._rows_of(self.lo).unsqueeze(-1).to(x.dtype)  # type: ignore[arg-type]
        clamped = torch.maximum(torch.minimum(proj, hi), lo)
        return x + (clamped - proj) * d


class TensorCache:
    """Device tensors of the groups, reused across points of a step and across steps.

    Within a step every layer whose actions have the same positions/steps touches the same
    rows with the same per-row table index, and in decode steps with an unchanged batch the
    vector tables stay the same too; building them is host work plus a host-to-device copy
    each, which for steering at every layer cost more than the steering itself. Entries live
    for the step they were last used in and the next one (so memory stays bounded by two
    steps' worth); call :meth:`next_step` once per forward.
    """

    def __init__(self) -> None:
        self._now: dict[tuple[Any, ...], Any] = {}
        self._prev: dict[tuple[Any, ...], Any] = {}

    def next_step(self) -> None:
        """Start a new step: entries unused in the previous one are dropped."""
        self._prev, self._now = self._now, {}

    def _get(self, key: tuple[Any, ...], make: Any) -> Any:
        hit = self._now.get(key)
        if hit is None:
            hit = self._prev.get(key)
            if hit is None:
                hit = make()
            self._now[key] = hit
        return hit

    def index(self, rows: list[int], device: torch.device) -> torch.Tensor:
        """``rows`` as a long tensor on ``device``."""
        key = ("i", str(device), *rows)
        return self._get(key, lambda: torch.tensor(rows, device=device))

    def table(self, op: str, acts: list[Action], device: torch.device) -> Group:
        """A :class:`Group` of ``op`` with its per-action tables (no rows yet)."""
        # the actions are kept alive by the cached group, so their ids cannot be reused
        key = ("t", op, str(device), *(id(a) for a in acts))
        return self._get(key, lambda: _table_group(op, acts, device))


def _table_group(op: str, acts: list[Action], device: torch.device) -> Group:
    g = Group(op, torch.empty(0), torch.empty(0))
    g.captures = [(None, a, None, []) for a in acts]   # pins the actions (see TensorCache)
    if op == "scale":
        g.factor = torch.tensor([a.factor for a in acts], device=device)
    elif op != "capture":
        g.table = torch.stack([a.vector for a in acts]).to(device)  # type: ignore[misc]
        if op == "clamp":
            g.lo = torch.tensor([a.lo for a in acts], device=device)
            g.hi = torch.tensor([a.hi for a in acts], device=device)
    return g


def _ascending(rows: list[int]) -> bool:
    return all(b == a + 1 for a, b in zip(rows, rows[1:], strict=False))


def build_groups(entries: list[tuple[Any, RowSpan, list[Action]]],
                 device: torch.device, cache: TensorCache | None = None) -> list[Group]:
    """Groups for one point this step; ``entries`` = (request state, its rows, its actions).

    Actions of one request run in order; the k-th actions of all requests form slot k, and
    within a slot requests touch disjoint rows, so each (slot, op) is one batched op. A
    request whose row selection fails (e.g. a bad position) fails alone. ``cache`` shares the
    device tensors with other points and steps (see :class:`TensorCache`).
    """
    cache = cache or TensorCache()
    groups: list[Group] = []
    slot = 0
    while True:
        by_op: dict[str, tuple[list[int], list[int], list[Action], list[Any]]] = {}
        any_left = False
        for state, span, actions in entries:
            if slot >= len(actions) or state.failed:
                continue
            any_left = True
            a = actions[slot]
            try:
                rows = row_mask(a, span, state.mask_cache)
            except Exception as exc:
                state.fail(f"{type(exc).__name__}: {exc}")
                continue
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
            t = cache.table(op, acts, device)
            g = Group(op, cache.index(rows, device), cache.index(tidx, device),
                      table=t.table, factor=t.factor, lo=t.lo, hi=t.hi,
                      owners=[o[0] for o in owners])
            if op == "capture":
                g.captures = [(st, a, sp, r) for (st, sp, r), a in zip(owners, acts, strict=True)]
            else:  # captures keep gathers: a slice would hand out views of vLLM's buffers
                g.identity = len(rows) == len(acts)
                if rows[-1] - rows[0] + 1 == len(rows) and _ascending(rows):
                    g.span = slice(rows[0], rows[-1] + 1)
            groups.append(g)
        slot += 1

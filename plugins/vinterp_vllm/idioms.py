"""Idiomatic nnsight writes recognised as the steering shortcuts' actions (same math).

Users of nnsight steer by writing to module values rather than calling ``.steer()``;
:class:`Idioms` finds these writes in one invoke's nodes so that such graphs take the
vectorized path (``fastpath.plan_for``) instead of the general one:

* ``x[K] += v``, ``x[K] -= v``, ``x[K] = x[K] + v``, ``x[:] = x + v``, ``x += v`` (a module's
  output written back, or edited in place): steer;
* ``x[:] *= s``, ``x[:] = x * s``: scale;
* ``x[:] = x - (x @ d)[..., None] * d`` (also ``x[:] -= ...``, ``.unsqueeze(-1)``): ablate
  along ``d`` as given;

at any steps. K: ``:``, ``...``, or ``(:|0, seq[, :|...])`` with seq an int, a list of ints
or a slice (the rows ``x[:, seq]`` selects: prompt positions at step 0, the one row at decode
steps). Anything else (another operand, another layer's value, an extra op, a key that
selects nothing) is left alone and fails the plan: the graph runs on the general path.

Steer and scale idioms are the shortcuts' float ops exactly (``v`` cast to the value's dtype
first, as ``.steer`` does: a float64 ``v`` on a float32 model differs from HF by one
rounding); the ablation's projection sums ``x * d`` where HF's ``x @ d`` may sum in another
order (~1e-7 relative in float32).
"""

from __future__ import annotations

from typing import Any

import torch

from vinterp.ir import ops
from vinterp.ir.schema import EllipsisV, Graph, Node, Ref, TensorRef, TupleV, Value
from vinterp.ir.tensors import decode_tensor
from vinterp.ir.validate import node_refs
from vinterp_vllm.actions import FAST_VALUES, Action, NotFast, is_full_slice, is_int, selection

#: in-place ops of the idioms and the out-of-place op each one mirrors
_INPLACE = {"iadd": "add", "isub": "sub", "imul": "mul"}
_EDIT_VALUES = FAST_VALUES - {"attn"}     # HF attention is a tuple: its edits stay general
_LAST_DIM = TupleV(tuple=(EllipsisV(ellipsis=True), None))


class Idioms:
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
            raise NotFast
        return self.by_id[v.ref]

    def _point(self, v: Value, edit: Node) -> tuple[str, str]:
        """The point whose value ``v`` is, read at ``edit``'s steps; else :class:`NotFast`."""
        n = self._node(v)
        if n.id not in self.points or n.steps != edit.steps:
            raise NotFast
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
        except (NotFast, KeyError, TypeError, ValueError, IndexError):
            return None

    def _in_place(self, e: Node) -> tuple[int, list[Action], set[int]] | None:
        """``x op= c`` on a module's value (edits it in place; nothing written back)."""
        try:
            point = self._point(e.args[0], e)
            used: set[int] = set()
            return (e.args[0].ref,  # type: ignore[union-attr]
                    self._actions(_INPLACE[e.op], e.args[1], None, e, point, used), used)
        except (NotFast, KeyError, TypeError, ValueError, IndexError):
            return None

    def _base(self, v: Node, point: tuple[str, str], e: Node) -> int:
        for arg in v.args:
            if isinstance(arg, Ref) and arg.ref in self.points \
                    and self._point(arg, e) == point:
                return arg.ref
        raise NotFast

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
            raise NotFast
        v = self._tensor(c.tensor)
        if not v.is_floating_point() or v.dim() > dims or v.dim() == 0:
            raise NotFast
        if v.dim() != 1 and any(n != 1 for n in v.shape[:-1]):
            raise NotFast    # per-row vectors: the general path
        if v.shape[-1] == 1:
            raise NotFast    # broadcast over the hidden dim (legal in torch, not a steer)
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
                raise NotFast
            sel = selection(key, self.prompt_len, start == 0,
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
    if key is None or is_full_slice(key) or isinstance(key, EllipsisV):
        return True
    return isinstance(key, TupleV) and 0 < len(key.tuple) <= 3 and all(
        is_full_slice(k) or isinstance(k, EllipsisV) for k in key.tuple)


def _key_dims(key: Value) -> int:
    """Dimensions of ``x[key]`` for a ``[batch, seq, hidden]`` value (keys ``selection`` takes)."""
    if _whole(key) or not isinstance(key, TupleV):
        return 3
    return 3 - sum(1 for k in key.tuple[:2] if is_int(k))


def _scalar(graph: Graph, c: Value) -> float:
    if isinstance(c, bool):
        raise NotFast
    if isinstance(c, (int, float)):
        return float(c)
    if isinstance(c, TensorRef):
        t = decode_tensor(graph.tensors[c.tensor])
        if t.dim() == 0 and t.dtype != torch.bool:
            return float(t)
    raise NotFast

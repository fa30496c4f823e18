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
"""

from __future__ import annotations

from dataclasses import dataclass, field
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

    def wants_step(self, step: int) -> bool:
        return self.start <= step < self.stop

    def assemble(self, step: int, chunks: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
        """The saved value at ``step`` from its captured ``(position, row)`` chunks, HF-shaped."""
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
        for n in mine:
            if n.invoke != invoke:
                raise _NotFast
            if n.op == "getitem":
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
    # a value used after it was saved must not be an alias read later at another step
    return plan


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


def _row_mask(a: Action, span: RowSpan, cache: dict[tuple[Any, ...], list[int]]) -> list[int]:
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
                rows = _row_mask(a, span, state.mask_cache)
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

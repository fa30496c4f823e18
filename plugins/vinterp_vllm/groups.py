"""The vectorized path's per-step grouping: all requests' actions at a point as batched ops.

Each step, :func:`build_groups` gathers all requests' actions at a point into groups (one per
op and slot): the rows to touch and, per row, an index into a table of this step's vectors —
like vLLM's LoRA token mapping. A hook then runs one batched tensor op per group
(:meth:`Group.apply`), with no loop over requests and no limit on distinct vectors.
The groups' device tensors are shared by all points of a step and reused by the next step when
the batch is unchanged (:class:`TensorCache`).

The math is :mod:`vinterp.steering.kernels`' (same order of float operations), so the results
equal the HF backend's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from vinterp.steering.kernels import position_mask
from vinterp_vllm.actions import Action
from vinterp_vllm.layout import RowSpan


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
            # in float32, rounded once (as the library's rows * factor does): a bfloat16
            # factor is already off (0.3 is 0.30078), which moved about half the values
            factor = self._rows_of(self.factor).unsqueeze(-1)  # type: ignore[arg-type]
            return (x * factor).to(x.dtype)
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
        #: this step's groupings by the points' keys (see :func:`build_groups`); keyed by the
        #: requests' indices in the step, so they live for one step only
        self.layouts: dict[tuple[Any, ...], list[_Layout]] = {}

    def next_step(self) -> None:
        """Start a new step: entries unused in the previous one are dropped."""
        self._prev, self._now = self._now, {}
        self.layouts = {}

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


@dataclass
class _Layout:
    """How one (slot, op) of a point's entries groups: the rows, each row's table index, and
    which entries own them (entry index and its rows), with the group's row shortcuts."""

    op: str
    slot: int
    rows: torch.Tensor
    table_index: torch.Tensor
    members: list[tuple[int, list[int]]]
    span: slice | None
    identity: bool


def build_groups(entries: list[tuple[Any, RowSpan, list[Action]]],
                 device: torch.device, cache: TensorCache | None = None,
                 key: tuple[Any, ...] | None = None) -> list[Group]:
    """Groups for one point this step; ``entries`` = (request state, its rows, its actions).

    Actions of one request run in order; the k-th actions of all requests form slot k, and
    within a slot requests touch disjoint rows, so each (slot, op) is one batched op. A
    request whose row selection fails (e.g. a bad position) fails alone. ``cache`` shares the
    device tensors with other points and steps (see :class:`TensorCache`). ``key``: what
    decides the grouping, equal for two points of this step that group alike (per entry: the
    request's index in the step and its ``ActionList.layout_id``); the grouping is then
    worked out once (steering all 30 layers worked the same rows out 30 times a step).
    """
    cache = cache or TensorCache()
    found = cache.layouts.get(key) if key is not None else None
    if found is None:
        found, clean = _group_layouts(entries, device, cache)
        if not clean:
            # a request failed: groupings kept this step may hold it, and must not serve it
            cache.layouts.clear()
        elif key is not None:
            cache.layouts[key] = found
    groups = []
    for lay in found:
        acts = [entries[i][2][lay.slot] for i, _ in lay.members]
        t = cache.table(lay.op, acts, device)
        g = Group(lay.op, lay.rows, lay.table_index, table=t.table, factor=t.factor, lo=t.lo,
                  hi=t.hi, owners=[entries[i][0] for i, _ in lay.members], span=lay.span,
                  identity=lay.identity)
        if lay.op == "capture":
            g.captures = [(entries[i][0], a, entries[i][1], r)
                          for (i, r), a in zip(lay.members, acts, strict=True)]
        groups.append(g)
    return groups


def _group_layouts(entries: list[tuple[Any, RowSpan, list[Action]]], device: torch.device,
                   cache: TensorCache) -> tuple[list[_Layout], bool]:
    """The groupings of :func:`build_groups`, and whether no request failed on the way."""
    out: list[_Layout] = []
    clean = True
    slot = 0
    while True:
        by_op: dict[str, tuple[list[int], list[int], list[tuple[int, list[int]]]]] = {}
        any_left = False
        for i, (state, span, actions) in enumerate(entries):
            if slot >= len(actions) or state.failed:
                continue
            any_left = True
            a = actions[slot]
            try:
                rows = row_mask(a, span, state.mask_cache)
            except Exception as exc:
                state.fail(f"{type(exc).__name__}: {exc}")
                clean = False
                continue
            if not rows:
                continue
            bucket = by_op.setdefault(a.op, ([], [], []))
            k = len(bucket[2])
            bucket[0].extend(rows)
            bucket[1].extend([k] * len(rows))
            bucket[2].append((i, rows))
        if not any_left:
            return out, clean
        for op, (rows, tidx, members) in by_op.items():
            span = None
            if op != "capture" and rows[-1] - rows[0] + 1 == len(rows) and _ascending(rows):
                span = slice(rows[0], rows[-1] + 1)   # captures keep gathers: a slice would
                                                      # hand out views of vLLM's buffers
            out.append(_Layout(op, slot, cache.index(rows, device), cache.index(tidx, device),
                               members, span, op != "capture" and len(rows) == len(members)))
        slot += 1

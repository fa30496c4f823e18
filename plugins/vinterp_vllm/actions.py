"""What a vectorized plan is made of: :class:`Action` (one steering op or capture at a point)
and :class:`Selection` (the positions ``x[:, positions]`` saves), with the resolution of a
``getitem`` key into a selection.

Planning (``fastpath.py``) and idiom recognition (``idioms.py``) build actions, the per-step
grouping (``groups.py``) and the table path (``tables.py``) run them. The planner gives up
on a graph by raising :class:`NotFast` (the graph then runs on the general path); idiom
recognition leaves what it does not recognise as it is, and that then fails the plan.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch

from vinterp.ir.schema import EllipsisV, ListV, Node, SliceV, TupleV, Value

#: points whose value is one plain [rows, hidden] tensor (fast path can serve them)
FAST_VALUES = frozenset({"residual", "tensor", "norm", "attn"})


class NotFast(Exception):  # noqa: N818 - control flow
    """Not a graph (or key) the vectorized path serves: the general path runs it."""


_LAYOUT_IDS = itertools.count()


@lru_cache(maxsize=4096)
def _layout_id(layout: tuple[Any, ...]) -> int:
    # a counter never hands out an id twice: after an eviction an equal layout gets a new id,
    # which only forgoes sharing, never groups two different layouts together
    return next(_LAYOUT_IDS)


class ActionList(list):
    """One request's actions at one point, with ``layout_id``: equal for equal layouts, what
    decides the rows the actions touch and how they group (op, positions, steps, per action).
    Two points whose requests have equal layouts group the same way in a step, so
    ``groups.build_groups`` works the grouping out once for both (steering every layer: once
    per step instead of once per layer)."""

    def __init__(self, actions: list[Action]) -> None:
        super().__init__(actions)
        self.layout_id = _layout_id(tuple((x.op, x.spec_key, x.start, x.stop)
                                          for x in actions))


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


def is_full_slice(v: Value) -> bool:
    return isinstance(v, SliceV) and all(x is None for x in v.slice)


def is_int(v: Value) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def selection(key: Value, prompt_len: int, prompt: bool, decodes: bool) -> Selection:
    """The :class:`Selection` of a ``getitem`` key, or :class:`NotFast` if it is not one.

    Resolved once per distinct key (a request saving ``x[:, -1]`` at 30 layers has 30 equal
    keys). Only keys of ints, ``None`` and ``...`` are cached: IR values compare by value, and
    ``True == 1`` and ``1.0 == 1`` must not share an entry.
    """
    if not _ints_only(key):
        raise NotFast
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
    """Uncached :func:`selection` (keys already checked by ``_ints_only``).

    Accepted: ``(d0, seq)`` or ``(d0, seq, :|...)`` with ``d0`` ``:`` or ``0`` and ``seq`` an
    int, a list of ints or a slice of ints. ``prompt`` / ``decodes``: the save runs at step 0 /
    at decode steps.
    Keys that would raise or select nothing in HF go to the general path (which reproduces HF).
    """
    if not isinstance(key, TupleV) or len(key.tuple) not in (2, 3):
        raise NotFast
    d0v, seqv, *restv = key.tuple
    if is_full_slice(d0v):
        d0: Any = slice(None)
    elif is_int(d0v) and d0v == 0:
        d0 = 0
    else:
        raise NotFast
    if restv and not (is_full_slice(restv[0]) or isinstance(restv[0], EllipsisV)):
        raise NotFast
    rest = (slice(None),) if restv else ()
    if is_int(seqv):
        seq: Any = seqv
    elif isinstance(seqv, ListV) and seqv.list and all(is_int(x) for x in seqv.list):
        seq = list(seqv.list)
    elif isinstance(seqv, SliceV) and all(x is None or is_int(x) for x in seqv.slice):
        seq = slice(*seqv.slice)  # type: ignore[misc]
    else:
        raise NotFast

    def resolve(n: int) -> tuple[int, ...]:
        # torch's indexing rules on range(n) (plain Python: this runs per request and save)
        rows = range(n)
        try:
            if isinstance(seq, int):
                return (rows[seq],)
            if isinstance(seq, slice):
                if seq.step is not None and seq.step <= 0:
                    raise NotFast  # torch refuses non-positive slice steps: the general path
                return tuple(rows[seq])
            return tuple(rows[i] for i in seq)
        except IndexError as exc:
            raise NotFast from exc

    prompt_index = resolve(prompt_len) if prompt else ()
    decode_index = resolve(1) if decodes else ()
    if (prompt and not prompt_index) or (decodes and not decode_index):
        raise NotFast
    return Selection(d0, is_int(seqv), rest, prompt_index, decode_index,
                     frozenset(prompt_index))

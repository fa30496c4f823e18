"""The table path: steering and captures as tensor math on persistent tables, so that a
compiled step runs no Python at all and full CUDA graphs can replay it.

``graph_points="tables"`` (``additional_config={"vinterp": {...}}``). The hook at each residual
point (embeddings, layer outputs, final norm) traces :func:`table_rows` into the compiled graph
(plain tensor ops, which inductor fuses with their neighbours) and returns the updated output;
captured rows leave through ``torch.ops.vinterp.slots`` (:func:`write_slots`). Both read device
tables allocated when the hooks go in:

* ``rowmap[row, point] = (entry, pre slot, post slot)``: what each row of the step gets there;
* per entry ``e``: a vector ``vec[e]`` and ``coef[e] = (a, sb, sd, lo, hi)``, and the row
  becomes ``a·x + sb·v + v·(clamp(p, lo, hi) − p)`` with ``p = x·(sd·v)``. That one update is
  steer (``a=1, sb=1``), scale (``a=f``), replace (``a=0, sb=1``), ablate (``sd=1, lo=hi=0``)
  and clamp (``sd=1``), with the float operations of the vectorized path (``groups.Group``);
  entry 0 is the identity, and rows with entry 0 are left exactly as they were;
* ``capbuf[slot]``: the value of each captured row, before (pre) or after (post) the update;
  slot 0 is where every other row's copy goes;
* ``flags[row]``: set where the update would have made the row inf or NaN (it then keeps its
  value); read after the step without a sync of its own, and its requests fail
  (:meth:`StepTables.blame`);
* ``reached[point]``: set by each point's capture write, so a point the forward never ran
  (vLLM embedding the tokens outside the model's forward, say) is known after the step: its
  requests fail instead of taking whatever an earlier step left in their capture slots, and
  the slots a step uses are NaN until written (:meth:`StepTables.fill`), so not even a stream
  that reads them before the check lands can see another request's rows.

:meth:`StepTables.plan` turns a step's vectorized actions into tables (or answers ``None``
when they cannot be expressed: the step then runs eagerly with the Python hooks), :meth:`fill`
copies them to the device (one copy per table, none for vectors unchanged since the last step)
and :meth:`collect` hands the captured rows to their requests after the forward.

Nothing in :func:`table_rows` or :func:`write_slots` reads a tensor's values on the host or
has a value-dependent shape, so a CUDA graph captured once serves every later step: the tables
hold the step.

Example::

    t = StepTables(points=2, rows=8192, hidden=576, dtype=torch.float32,
                   device=torch.device("cuda"), entries=4096, slots=8192)
    plan = t.plan(fast, {("model.layers.3", "output"): 1}, n_rows=64)
    if plan is not None:
        t.fill(plan)             # before the forward
        ...                      # the forward replays its graph
        t.collect()              # captured rows reach their requests
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from vinterp_vllm.actions import Action
from vinterp_vllm.finite import rows_finite, to_host
from vinterp_vllm.groups import row_mask
from vinterp_vllm.layout import RowSpan

#: ``coef`` columns
A, SB, SD, LO, HI = range(5)
#: columns of ``rowmap``'s last dimension
ENTRY, PRE, POST = range(3)


def table_rows(x: torch.Tensor, y: torch.Tensor | None, tid: torch.Tensor,
               rowmap: torch.Tensor, vec: torch.Tensor, coef: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor,
                          torch.Tensor, torch.Tensor, torch.Tensor]:
    """The table update at one point, as plain tensor ops (traced into the compiled graph,
    where inductor fuses them): ``x`` (and ``y``, a fused layer's residual: the stream is
    ``x + y``) are this step's ``[rows, hidden]`` values there, ``rowmap[:, tid]`` says what
    each row gets.

    Returns ``(new x, new y, stream before, stream after, pre slots, post slots, bad)``.
    Rows with entry 0 keep ``x`` and ``y`` exactly; touched rows get the new stream in ``x``
    and 0 in ``y`` (so the next fused add gives exactly it, as in ``events.point_rows``).
    ``bad``: the rows the update would have made inf/NaN (finite before), which keep theirs.
    """
    n = x.shape[0]
    m = rowmap[:n].index_select(1, tid).reshape(n, 3)
    entry, pre, post = m[:, ENTRY], m[:, PRE], m[:, POST]
    s = x if y is None else x + y
    v = vec.index_select(0, entry).to(s.dtype)
    c = coef.index_select(0, entry).to(s.dtype)
    a, sb, sd, lo, hi = (c[:, i:i + 1] for i in range(5))
    p = (s * (v * sd)).sum(-1, keepdim=True)
    new = a * s + sb * v + v * (torch.clamp(p, lo, hi) - p)
    # a row the update makes inf/NaN keeps its value (the KV cache would carry it to other
    # requests, see finite.py) and is flagged; graph-safe, no sync
    edited = entry != 0
    finite = rows_finite(new)
    bad = edited & ~finite & rows_finite(s)
    touched = (edited & finite).unsqueeze(-1)
    new_y = None if y is None else y.masked_fill(touched, 0)
    return (torch.where(touched, new, x), new_y, s, torch.where(touched, new, s), pre, post,
            bad)


def write_slots(capbuf: torch.Tensor, pre: torch.Tensor, before: torch.Tensor,
                post: torch.Tensor, after: torch.Tensor, flags: torch.Tensor,
                bad: torch.Tensor, reached: torch.Tensor, tid: torch.Tensor) -> None:
    """Copy each row's stream before / after the update into its capture slot (slot 0 takes
    every row nobody captures), mark the ``bad`` rows in ``flags`` and this point's column
    ``tid`` in ``reached``. The op ``vinterp::slots``: writes into persistent buffers, like
    vLLM's KV-cache update, so the graph keeps them in place and a CUDA graph replays them."""
    capbuf.index_copy_(0, pre, before.to(capbuf.dtype))
    capbuf.index_copy_(0, post, after.to(capbuf.dtype))
    flags[:bad.shape[0]].logical_or_(bad)
    # the point's proof that it ran this step (one tiny kernel; StepTables.blame reads it)
    reached.index_fill_(0, tid, True)


def _coef(a: Action) -> tuple[float, float, float, float, float]:
    """``(a, sb, sd, lo, hi)`` of one steering action (see the module doc)."""
    inf = float("inf")
    if a.op == "steer":
        return (1.0, 1.0, 0.0, -inf, inf)
    if a.op == "scale":
        return (a.factor, 0.0, 0.0, -inf, inf)
    if a.op == "replace":
        return (0.0, 1.0, 0.0, -inf, inf)
    if a.op == "ablate":
        return (1.0, 0.0, 1.0, 0.0, 0.0)
    if a.op == "clamp":
        return (1.0, 0.0, 1.0, a.lo, a.hi)
    raise ValueError(f"no table form for {a.op!r}")


@dataclass
class TablePlan:
    """One step's tables on the host, from :meth:`StepTables.plan`."""

    rowmap: torch.Tensor                      # [n_rows, points, 3], from ``where``/``what``
    entries: list[Action]                     # entry i + 1
    #: flat ``rowmap`` indices and their values, gathered in plain Python (one tensor write at
    #: the end: indexing a tensor per request and point cost more than the whole plan)
    where: list[int] = field(default_factory=list)
    what: list[int] = field(default_factory=list)
    #: (request state, capture action, its span, its rows, their slots)
    captures: list[tuple[Any, Action, RowSpan, list[int], list[int]]] = field(
        default_factory=list)
    #: requests with edits this step and their spans (blamed for rows the edits flag)
    edited: list[tuple[Any, RowSpan]] = field(default_factory=list)
    slots: int = 1                            # slots used, the trash slot 0 included
    points: set[tuple[str, str]] = field(default_factory=set)
    #: (request state, table column) for every request with rows to edit or capture there:
    #: each fails if the forward never reached that column's point
    needs: list[tuple[Any, int]] = field(default_factory=list)


class _TooMuch(Exception):  # noqa: N818 - control flow: the step runs eagerly
    pass


class StepTables:
    """The device tables of one engine and the per-step work around them."""

    def __init__(self, *, points: int, rows: int, hidden: int, dtype: torch.dtype,
                 device: torch.device, entries: int, slots: int,
                 names: list[str] | None = None) -> None:
        self.points, self.rows, self.entries, self.slots = points, rows, entries, slots
        #: each column's point, for error messages
        self.names = names or [f"table column {i}" for i in range(points)]
        self.rowmap = torch.zeros(rows, points, 3, dtype=torch.long, device=device)
        self.vec = torch.zeros(entries, hidden, dtype=dtype, device=device)
        self.coef = torch.zeros(entries, 5, dtype=dtype, device=device)
        self.coef[0] = torch.tensor([1.0, 0.0, 0.0, float("-inf"), float("inf")])
        self.capbuf = torch.zeros(slots, hidden, dtype=dtype, device=device)
        self.flags = torch.zeros(rows, dtype=torch.bool, device=device)
        self.reached = torch.zeros(points, dtype=torch.bool, device=device)
        #: table steps' flags on their way to the host: (edited, host flags or None, needs,
        #: host reached, CUDA event)
        self._flagged: list[tuple[list[tuple[Any, RowSpan]], torch.Tensor | None,
                                  list[tuple[Any, int]], torch.Tensor, Any]] = []
        self._dirty = 0              # rows of ``rowmap`` the last fill may have set
        #: the actions whose vectors the device tables hold (kept alive, so that an equal
        #: list is the same actions, not new ones at recycled addresses)
        self._held: list[Action] = []
        self._pending: TablePlan | None = None
        self._pin = device.type == "cuda"

    def shared(self) -> dict[str, torch.Tensor]:
        """The tables every point's op reads (registered as buffers on the hooked modules)."""
        return {"rowmap": self.rowmap, "vec": self.vec, "coef": self.coef,
                "capbuf": self.capbuf, "flags": self.flags, "reached": self.reached}

    # ------------------------------------------------------------------ planning
    def plan(self, fast: dict[tuple[str, str, str], list[tuple[Any, RowSpan, list[Action]]]],
             table_index: dict[tuple[str, str], int], n_rows: int) -> TablePlan | None:
        """This step's tables, or ``None`` when they cannot hold it: a point outside the
        tables, two edits of one row at one point, a capture between edits, more entries or
        capture slots than the tables have. A request whose rows cannot be worked out fails
        alone (as on the vectorized path)."""
        if n_rows > self.rows:
            return None
        plan = TablePlan(torch.zeros(n_rows, self.points, 3, dtype=torch.long), [])
        entry_of: dict[int, int] = {}
        hooks: dict[tuple[str, str], str] = {}
        try:
            for (vmod, side, value), entries in fast.items():
                t = table_index.get((vmod, side))
                if t is None or hooks.setdefault((vmod, side), value) != value:
                    return None
                plan.points.add((vmod, side))
                slot_of: tuple[dict[int, int], dict[int, int]] = ({}, {})
                for st, span, actions in entries:
                    if not st.failed:
                        self._plan_request(plan, t, st, span, actions, entry_of, slot_of)
        except _TooMuch:
            return None
        if plan.where:
            plan.rowmap.view(-1)[torch.tensor(plan.where)] = torch.tensor(plan.what)
        return plan

    def _plan_request(self, plan: TablePlan, t: int, st: Any, span: RowSpan,
                      actions: list[Action], entry_of: dict[int, int],
                      slot_of: tuple[dict[int, int], dict[int, int]]) -> None:
        try:
            rows = [row_mask(a, span, st.mask_cache) for a in actions]
        except Exception as exc:
            st.fail(f"{type(exc).__name__}: {exc}")
            return
        edits = [i for i, (a, r) in enumerate(zip(actions, rows, strict=True))
                 if r and a.op != "capture"]
        if any(rows):
            plan.needs.append((st, t))
        # (vectors were checked against the hidden size when the request's graph was parsed)
        width = 3 * self.points
        touched: set[int] = set()
        for i in edits:
            if touched.intersection(rows[i]):
                raise _TooMuch    # two edits of one row: the Python hooks compose them
            touched.update(rows[i])
            a = actions[i]
            e = entry_of.get(id(a))
            if e is None:
                if len(plan.entries) + 1 >= self.entries:
                    raise _TooMuch
                plan.entries.append(a)
                e = entry_of[id(a)] = len(plan.entries)
            plan.where.extend(r * width + 3 * t + ENTRY for r in rows[i])
            plan.what.extend([e] * len(rows[i]))
        if edits:
            plan.edited.append((st, span))
        for i, (a, r) in enumerate(zip(actions, rows, strict=True)):
            if a.op != "capture" or not r:
                continue
            if edits and edits[0] < i < edits[-1]:
                raise _TooMuch    # a capture between two edits sees a state no table holds
            post = bool(edits) and i > edits[-1]
            stage, col = slot_of[post], (POST if post else PRE)
            slots = []
            for row in r:
                s = stage.get(row)
                if s is None:
                    if plan.slots >= self.slots:
                        raise _TooMuch
                    s = stage[row] = plan.slots
                    plan.slots += 1
                    plan.where.append(row * width + 3 * t + col)
                    plan.what.append(s)
                slots.append(s)
            plan.captures.append((st, a, span, r, slots))

    # ------------------------------------------------------------------ per step
    def fill(self, plan: TablePlan) -> None:
        """Copy ``plan`` to the device tables (rows past it back to the identity)."""
        n = plan.rowmap.shape[0]
        span = max(n, self._dirty)
        host = plan.rowmap
        if span > n:
            host = torch.cat([host, torch.zeros(span - n, self.points, 3, dtype=torch.long)])
        self.rowmap[:span].copy_(self._staged(host), non_blocking=True)
        self._dirty = n
        same = len(plan.entries) == len(self._held) and all(
            a is b for a, b in zip(plan.entries, self._held, strict=True))
        if not same:   # decode steps of an unchanged batch reuse the vectors
            k = len(plan.entries)
            if k:
                vec = torch.stack([self._vector(a) for a in plan.entries])
                coef = torch.tensor([_coef(a) for a in plan.entries], dtype=self.coef.dtype)
                self.vec[1:k + 1].copy_(self._staged(vec), non_blocking=True)
                self.coef[1:k + 1].copy_(self._staged(coef), non_blocking=True)
            self._held = list(plan.entries)
        if plan.needs:
            # (captures and edits only; on the device, no sync) the points mark themselves
            # as the forward runs them, and the slots this step hands out hold NaN until a
            # point writes them: a slot nothing wrote can never pass an earlier step's rows
            self.reached.zero_()
            if plan.slots > 1:
                self.capbuf[1:plan.slots].fill_(float("nan"))
        self._pending = plan if plan.needs else None

    def _vector(self, a: Action) -> torch.Tensor:
        if a.vector is None:    # scale: the coefficients say it all
            return torch.zeros(self.vec.shape[1], dtype=self.vec.dtype)
        return a.vector.to(self.vec.dtype).cpu()

    def _staged(self, t: torch.Tensor) -> torch.Tensor:
        # pinned host memory makes the copy asynchronous on CUDA; a fresh buffer per copy
        # keeps a copy still in flight from seeing the next step's values
        return t.pin_memory() if self._pin else t

    def clear(self) -> None:
        """Back to the identity everywhere (a step with no table work)."""
        if self._dirty:
            self.rowmap[:self._dirty].zero_()
            self._dirty = 0
        self._pending = None

    def collect(self) -> None:
        """After the forward: hand each captured row to its request (on the device, one
        copy of the used slots, since the next step overwrites them)."""
        plan, self._pending = self._pending, None
        if plan is None:
            return
        # the flags and the reached points leave without a sync: the copies are queued after
        # the forward and read once done (blame), normally at the next step: vLLM has read
        # the step's tokens
        host = None
        if plan.edited:
            n = plan.rowmap.shape[0]
            host, _ = to_host(self.flags[:n])
            self.flags[:n].zero_()
        reached, event = to_host(self.reached)   # (queued last: its event covers both)
        self._flagged.append((plan.edited, host, plan.needs, reached, event))
        if not plan.captures:
            return
        used = self.capbuf[:plan.slots].clone()
        for st, a, span, rows, slots in plan.captures:
            if st.failed:
                continue
            try:
                first = slots[0]
                if slots == list(range(first, first + len(slots))):
                    vals = used[first:first + len(slots)]
                else:
                    vals = used[torch.tensor(slots, device=used.device)]
                st.add_capture(a, span, rows, vals)
            except Exception as exc:  # never take the engine down: this request fails
                st.fail(f"{type(exc).__name__}: {exc}")

    def blame(self, dtype: torch.dtype, *, wait: bool = False) -> None:
        """Fail the requests whose edits earlier table steps flagged (rows that would have
        become inf/NaN, kept as they were: see :func:`table_rows`). Called before each step
        is planned, for the flags already on the host (``wait=False``: with vLLM's async
        scheduling the last step may still run, and waiting would stall the next one; a
        stream's take does the same), and before outcomes are drained (``wait=True``)."""
        while self._flagged:
            edited, host, needs, reached, event = self._flagged[0]
            if event is not None and not event.query():
                if not wait:
                    return
                event.synchronize()
            self._flagged.pop(0)
            if not bool(reached.all()):
                for st, t in needs:
                    if not reached[t]:
                        st.fail(f"the forward never reached {self.names[t]}, so this "
                                f"request's intervention there did not run (vLLM ran that "
                                f"module outside the model's compiled forward: an engine "
                                f"option such as enable_prompt_embeds=True, which vinterp "
                                f"refuses); please report it with the engine's settings")
            if host is None or not bool(host.any()):
                continue
            bad = host.nonzero().flatten().tolist()
            for st, span in edited:
                if any(span.start <= r < span.stop for r in bad):
                    st.fail_nonfinite("its steering", dtype)

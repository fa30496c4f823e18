"""Runs an intervention graph against the events of a forward pass, on any backend.

A backend (HF hooks, the vLLM plugin) tells the runner when the forward reaches a point
(``module`` + ``output``/``input``/``inputs``) by calling :meth:`GraphRunner.on_event` with a
:class:`PointEvent` that can read and replace each invoke's HF-shaped value there.

Scheduling is dataflow within each invoke: a node runs as soon as its point is reached (for
``read``/``write``) and its inputs exist, scanning in program order — so users may read
modules in any order (the seed reads every layer, then every attention), while nodes at the
same point keep the order they were written (a save before an edit sees the unedited value).
``backward`` is a barrier: nothing written after it runs before it. Invokes are served in the
order they were written, so a later invoke can use an earlier invoke's value from the same
point with no barrier.

An edit (a write, ``setitem``, an in-place op, a steering op) must run while the forward is at
the point its target came from. If it cannot because it needs another invoke's value that the
forward computes later, the backend gets :class:`NeedsPhases` and reruns the invokes in
dependency order (see :func:`invoke_phases`); if it needs a value its own invoke computes later,
that is an error.
"""

from __future__ import annotations

import heapq
import math
import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from vinterp.ir import ops, sizes
from vinterp.ir.errors import InterventionError, NeedsPhases, StopForward
from vinterp.ir.index import graph_index
from vinterp.ir.run_state import RunState, Saved, collect_results, snapshot
from vinterp.ir.schema import (
    DictV, DTypeV, EllipsisV, Graph, ListV, Node, Ref, SliceV, TensorRef, TupleV, Value,
)
from vinterp.ir.tensors import decode_tensor, torch_dtype
from vinterp.steering import apply_steering

#: largest tensor a graph may allocate with torch.zeros & co. (elements); other ops that
#: can allocate from their arguments' sizes have the same limit (see :mod:`.sizes`)
MAX_CONSTRUCTED_NUMEL = sizes.MAX_NUMEL


class PointEvent(Protocol):
    """What a backend hands the runner when the forward reaches a point.

    An event that serves several kinds at once (a pre-hook is both ``.input`` and
    ``.inputs``) may also have a ``kinds`` attribute (a set); the runner then passes
    ``kind=`` to ``get`` and ``set``.

    An event may also offer ``call_module(path) -> callable``: how ``call_module`` nodes call
    the model's module ``path`` (an HF path) on values, for backends whose model the runner
    only meets through events (the vLLM plugin). The runner's own ``modules`` wins if set.
    """

    module: str
    kind: str
    step: int

    def get(self, invoke: int) -> Any:
        """The invoke's HF-shaped value here (views: in-place edits write through)."""

    def set(self, invoke: int, value: Any) -> None:
        """Replace the invoke's value here."""

    def row_positions(self, invoke: int) -> torch.Tensor | None:
        """Absolute token position of each sequence row of the invoke's value, ``[n, seq]``;
        ``None`` where the inputs are not token sequences (a module wrapped with NNsight)."""

    def prompt_lens(self, invoke: int) -> torch.Tensor:
        """Prompt length of each of the invoke's sequences, ``[n, 1]``."""


@dataclass
class _Lane:
    """One invoke's (or the global, ``-1``) nodes to run at this step, in program order
    (the runner's ``_pending`` says which have not run yet)."""

    invoke: int
    nodes: list[Node]


def _first_device(values: Iterable[Any]) -> torch.device | None:
    for v in values:
        if isinstance(v, torch.Tensor):
            return v.device
        if isinstance(v, (list, tuple)):
            d = _first_device(v)
            if d is not None:
                return d
    return None


def _constructor_numel(fn: str, args: list[Any], kwargs: dict[str, Any]) -> int:
    if fn == "torch.arange":
        nums = [a for a in args if isinstance(a, (int, float))]
        start, end, step = (0, nums[0], 1) if len(nums) == 1 else (nums + [1])[:3]
        return max(0, math.ceil((end - start) / step)) if step else 0
    if fn == "torch.eye":
        n = int(args[0])
        return n * int(args[1] if len(args) > 1 and isinstance(args[1], int) else n)
    size = kwargs.get("size", args[0] if args else ())
    if isinstance(size, int):
        size = [a for a in args if isinstance(a, int)] if fn != "torch.full" else [size]
    return math.prod(int(s) for s in size)


class GraphRunner:
    """Executes a validated :class:`Graph` as a backend reports point events.

    Example (what a backend does)::

        runner = GraphRunner(graph)
        runner.begin_step(0)
        # ... forward hooks call runner.on_event(event) at each needed point ...
        runner.end_step()
        saved = runner.results()    # {save node id: value (list per step in scopes)}
    """

    def __init__(self, graph: Graph, *, state: RunState | None = None,
                 active_invokes: Iterable[int] | None = None,
                 modules: Callable[[str], Callable[..., Any]] | None = None,
                 live: Mapping[int, torch.Tensor] | None = None) -> None:
        self.graph = graph
        #: HF module path -> a callable running that module (``call_module`` nodes); set by
        #: backends that can call the model's modules on values
        self.modules = modules
        #: the last event's ``call_module`` (see :class:`PointEvent`), used when ``modules``
        #: is not set
        self._event_modules: Callable[[str], Callable[..., Any]] | None = None
        self.state = state or RunState()
        n_inv = max(1, len(graph.invokes))
        self.active = sorted(active_invokes) if active_invokes is not None else list(range(n_inv))
        self._phased = len(self.active) < n_inv
        #: constants by tensor-table index; ``live`` ones are the caller's own tensors (they
        #: require grad: autograd must reach them, see ``Backend.run``)
        self._constants: dict[int, torch.Tensor] = dict(live or {})
        self.wants_grad = bool(live) or any(
            n.op in ("backward", "retain_grad", "requires_grad")
            or (n.op == "getattr" and n.kwargs.get("name") == "grad")
            for n in graph.nodes
        )
        self.max_step = max(
            (n.steps.stop if n.steps.stop is not None else math.inf) for n in graph.nodes
        ) if graph.nodes else 1
        self._lanes: list[_Lane] = []
        self._step = 0
        self._stop = False
        self._fired: set[tuple[str, str]] = set()
        self._targets: dict[int, tuple[str, str] | None] = {}
        self._by_id = {n.id: n for n in graph.nodes}
        self._refs = dict(zip((n.id for n in graph.nodes), graph_index(graph).refs,
                              strict=True))
        # Per step (see _index_lanes): nodes not run yet, and who can unblock whom. A node's
        # slot is (lane index, position in the lane): the order a full pass would visit it.
        self._pending: set[int] = set()
        self._waiters: dict[int, list[tuple[int, int]]] = {}
        self._point_slots: dict[tuple[str, str], list[tuple[int, int]]] = {}
        self._edit_lanes: dict[tuple[str, str], set[int]] = {}
        self._backwards: dict[int, list[int]] = {}
        #: backward node -> the values whose .grad its `with` block reads
        self._block_grads: dict[int, set[int]] = {}
        self._grad_targets = self._link_grads(graph)

    def _link_grads(self, graph: Graph) -> set[int]:
        """Make each ``x.grad`` wait for the backward it belongs to; return the ``x`` ids.

        nnsight's three spellings put ``.grad`` in different places: after ``loss.backward()``
        (with ``retain_grad``), inside ``with loss.backward():`` (0.5+), or before the
        ``backward()`` call (0.4). A ``.grad`` node therefore waits for the first backward
        written after it, or, when there is none, for the last one before it; the tensors whose
        gradient is asked for keep it (``retain_grad``) as soon as they are computed.
        """
        backs = [n.id for n in graph.nodes if n.op == "backward"]
        targets: set[int] = set()
        for n in graph.nodes:
            if n.op != "getattr" or n.kwargs.get("name") != "grad" or not n.args \
                    or not isinstance(n.args[0], Ref):
                continue
            targets.add(n.args[0].ref)
            block = n.kwargs.get("backward")
            if isinstance(block, Ref):   # read inside `with loss.backward():` (a reference)
                self._block_grads.setdefault(block.ref, set()).add(n.args[0].ref)
                continue
            later = [b for b in backs if b > n.id]
            earlier = [b for b in backs if b < n.id]
            dep = later[0] if later else (earlier[-1] if earlier else None)
            if dep is not None and dep not in self._refs[n.id]:
                self._refs[n.id] = self._refs[n.id] + (dep,)
        return targets

    # ----------------------------------------------------------------- scheduling
    def _active_at(self, node: Node, step: int) -> bool:
        s = node.steps
        return s.start <= step and (s.stop is None or step < s.stop) and (
            node.invoke < 0 or node.invoke in self.active)

    def begin_step(self, step: int) -> None:
        """Start forward number ``step`` (0 = the prompt)."""
        self._step = step
        self._fired = set()
        lanes = [_Lane(i, []) for i in self.active] + [_Lane(-1, [])]
        index = {lane.invoke: lane for lane in lanes}
        env_step = self.state.env_step
        for n in self.graph.nodes:
            # (a node already run at this step in an earlier phase is not run again)
            if self._active_at(n, step) and env_step.get(n.id, -1) != step:
                index[n.invoke].nodes.append(n)
        self._lanes = [lane for lane in lanes if lane.nodes]
        self._index_lanes()
        self._advance(None)

    def _index_lanes(self) -> None:
        """Index this step's nodes by what can unblock them: a value they need
        (``_waiters``), the point an access waits for (``_point_slots``); and lanes by the
        points their edits target (``_edit_lanes``, checked by ``on_event``).

        Without it every event rescanned every pending node of every invoke: with 64
        invokes steering 30 layers, ~1M readiness checks per 17 generated tokens, half the
        run's time.
        """
        waiters: dict[int, list[tuple[int, int]]] = {}
        points: dict[tuple[str, str], list[tuple[int, int]]] = {}
        edits: dict[tuple[str, str], set[int]] = {}
        backwards: dict[int, list[int]] = {}
        pending: set[int] = set()
        for li, lane in enumerate(self._lanes):
            for pos, node in enumerate(lane.nodes):
                pending.add(node.id)
                for r in self._refs[node.id]:
                    waiters.setdefault(r, []).append((li, pos))
                if node.op in ops.POINT_OPS:
                    points.setdefault((node.kwargs["module"], node.kwargs["kind"]),
                                      []).append((li, pos))
                elif node.op == "backward":
                    backwards.setdefault(li, []).append(pos)
                if lane.invoke >= 0:
                    target = self._target_point(node)
                    if target is not None:
                        edits.setdefault(target, set()).add(li)
        self._pending, self._waiters, self._point_slots = pending, waiters, points
        self._edit_lanes, self._backwards = edits, backwards

    def _left(self, lane: _Lane) -> list[Node]:
        """The lane's nodes that have not run at this step, in program order."""
        return [n for n in lane.nodes if n.id in self._pending]

    def on_event(self, ev: PointEvent) -> None:
        """The forward reached ``(ev.module, ev.kind)``: run everything that can run now."""
        kinds = getattr(ev, "kinds", (ev.kind,))
        for kind in kinds:
            self._fired.add((ev.module, kind))
        caller = getattr(ev, "call_module", None)
        if caller is not None:
            self._event_modules = caller
        self._advance(ev)
        edit_lanes: set[int] = set()
        for kind in kinds:
            edit_lanes |= self._edit_lanes.get((ev.module, kind), set())
        for li in sorted(edit_lanes):
            for node in self._left(self._lanes[li]):
                target = self._target_point(node)
                if target is None or target[0] != ev.module or target[1] not in kinds:
                    continue
                # An edit of this point could not run while the model is here; later would be
                # too late (the model has used the value).
                if self._needs_other_invoke(node) and not self._phased:
                    raise NeedsPhases
                raise self._error(node, (
                    f"it edits {_point_name(target)} but needs a value computed later in "
                    "the forward (or after a backward); an edit must only use values "
                    "available when the model reaches that point"))
        if self._stop and not self._pending:
            raise StopForward

    def end_step(self) -> None:
        """The forward ended: every node must have run, else explain why not."""
        self._advance(None)
        for lane in self._lanes:
            for node in self._left(lane):
                if node.op in ops.POINT_OPS:
                    point = (node.kwargs["module"], node.kwargs["kind"])
                    if self._stop:
                        continue
                    if point in self._fired:
                        raise self._error(node, (
                            f"{_point_name(point)} was reached while this access waited for "
                            "an earlier backward() in your code; access modules before "
                            "calling backward()"))
                    raise self._error(node, (
                        f"{_point_name(point)} was never reached in forward step {self._step}"
                        " (the module did not run, or the generation ended before this step)"))
                if lane.invoke < 0 and self._phased:
                    continue  # combines invokes of later phases: runs when they have run
                if self._needs_other_invoke(node) and not self._phased:
                    raise NeedsPhases
                if not self._stop:
                    raise self._error(node, "could not run: a value it needs was never computed")

    def _needs_other_invoke(self, node: Node) -> bool:
        """Whether ``node`` (or what it waits on) needs a value of another invoke."""
        env = self.state.env
        stack, seen = [node], set()
        while stack:
            n = stack.pop()
            if n.id in seen:
                continue
            seen.add(n.id)
            for r in self._refs[n.id]:
                src = self._node(r)
                if src.invoke >= 0 and src.invoke != node.invoke and r not in env:
                    return True
                if r not in env:
                    stack.append(src)
        return False

    def _target_point(self, node: Node) -> tuple[str, str] | None:
        """The point an editing node changes (``None`` for nodes that edit nothing)."""
        cache = self._targets
        if node.id in cache:
            return cache[node.id]
        target: tuple[str, str] | None = None
        if node.op == "write":
            target = (node.kwargs["module"], node.kwargs["kind"])
        elif ops.is_edit(node) and node.args \
                and isinstance(node.args[0], Ref):
            src = self._node(node.args[0].ref)
            while src.op != "read" and src.args and isinstance(src.args[0], Ref) \
                    and ops.is_view(src.op, src.kwargs.get("name")):
                src = self._node(src.args[0].ref)
            if src.op == "read":
                target = (src.kwargs["module"], src.kwargs["kind"])
        cache[node.id] = target
        return target

    def _ready(self, node: Node) -> bool:
        env, env_step, step = self.state.env, self.state.env_step, self._step
        for r in self._refs[node.id]:
            if r not in env:
                return False
            # a value from this step is needed if its node also runs at this step
            if env_step[r] != step and self._active_at(self._by_id[r], step):
                return False
        return True

    def _node(self, node_id: int) -> Node:
        return self._by_id[node_id]

    def _advance(self, ev: PointEvent | None) -> None:
        """Run every node that can run now, until none can.

        Equivalent to repeated full passes over all lanes in invoke order, each lane in
        program order, running whatever is ready, until a pass runs nothing; but only nodes
        something can have unblocked are visited: all at ``None`` (step start and end), else
        the accesses of this point, then the users of each value just computed. A node
        unblocked by one later in pass order runs in this pass, by an earlier one in the next,
        as in a full pass.
        """
        lanes, pending = self._lanes, self._pending
        if ev is None:
            this_pass = [(li, pos) for li, lane in enumerate(lanes)
                         for pos, n in enumerate(lane.nodes) if n.id in pending]
        else:
            this_pass = []
            for kind in getattr(ev, "kinds", (ev.kind,)):
                this_pass += self._point_slots.get((ev.module, kind), ())
            heapq.heapify(this_pass)
        queued = set(this_pass)
        next_pass: set[tuple[int, int]] = set()
        while this_pass:
            while this_pass:
                slot = heapq.heappop(this_pass)
                li, pos = slot
                node = lanes[li].nodes[pos]
                if node.id not in pending or not (
                    node.op not in ops.POINT_OPS or _at_point(ev, node)
                ) or self._blocked(li, pos) or not self._ready(node):
                    continue
                self._run(node, ev)
                pending.discard(node.id)
                woken = self._waiters.get(node.id, [])
                if node.op == "backward":
                    # nothing written after a pending backward may run before it: what it
                    # held back may run now
                    self._backwards[li].remove(pos)
                    woken = woken + [(li, p) for p in range(pos + 1, len(lanes[li].nodes))]
                for w in woken:
                    if w > slot:
                        if w not in queued:
                            heapq.heappush(this_pass, w)
                            queued.add(w)
                    else:
                        next_pass.add(w)
            this_pass = sorted(next_pass)
            queued = set(this_pass)
            next_pass = set()

    def _blocked(self, li: int, pos: int) -> bool:
        """Whether a backward before ``pos`` in lane ``li`` has not run yet."""
        backs = self._backwards.get(li)
        return bool(backs) and min(backs) < pos

    # ----------------------------------------------------------------- execution
    def _error(self, node: Node, msg: str) -> InterventionError:
        where = f" (at {node.line})" if node.line else ""
        return InterventionError(f"intervention node {node.id} [{_describe(node)}]{where}: {msg}")

    def _constant(self, idx: int, device: torch.device | None) -> torch.Tensor:
        t = self._constants.get(idx)
        if t is None:
            t = self._constants[idx] = decode_tensor(self.graph.tensors[idx])
        if device is not None and t.device != device:
            t = self._constants[idx] = t.to(device)
        return t

    def _resolve(self, v: Value, device: torch.device | None) -> Any:
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, Ref):
            return self.state.env[v.ref]
        if isinstance(v, TensorRef):
            return self._constant(v.tensor, device)
        if isinstance(v, SliceV):
            return slice(*(self._resolve(x, device) for x in v.slice))
        if isinstance(v, EllipsisV):
            return Ellipsis
        if isinstance(v, ListV):
            return [self._resolve(x, device) for x in v.list]
        if isinstance(v, TupleV):
            return tuple(self._resolve(x, device) for x in v.tuple)
        if isinstance(v, DictV):
            return {k: self._resolve(x, device) for k, x in v.mapping.items()}
        if isinstance(v, DTypeV):
            return torch_dtype(v.dtype)
        raise TypeError(f"unknown IR value {v!r}")

    def _device_of(self, node: Node) -> torch.device | None:
        return _first_device([self.state.env[r] for r in self._refs[node.id]])

    def _run(self, node: Node, ev: PointEvent | None) -> None:
        try:
            value = self._execute(node, ev)
        except (StopForward, NeedsPhases, InterventionError):
            raise
        except (torch.OutOfMemoryError, MemoryError) as exc:
            # this request's failure alone: the value it asked for is dropped with the error
            raise self._error(node, (
                f"ran out of memory computing this value ({type(exc).__name__}: "
                f"{str(exc)[:200]}); make it smaller (fewer positions or repeats)")) from exc
        except Exception as exc:  # any failure is reported against the user's line
            raise self._error(node, f"{type(exc).__name__}: {exc}") from exc
        if node.id in self._grad_targets and isinstance(value, torch.Tensor) \
                and value.requires_grad and not value.is_leaf:
            value.retain_grad()
        self.state.env[node.id] = value
        self.state.env_step[node.id] = self._step

    def _execute(self, node: Node, ev: PointEvent | None) -> Any:
        op = node.op
        device = self._device_of(node)
        args = [self._resolve(a, device) for a in node.args]
        kwargs = {k: self._resolve(v, device) for k, v in node.kwargs.items()}
        if op == "read":
            assert ev is not None
            # positions are only needed by steering ops: computed on first use
            self.state.positions[node.id] = _lazy_positions(ev, node.invoke)
            return ev.get(node.invoke, **_kind_arg(ev, node))
        if op == "write":
            assert ev is not None
            ev.set(node.invoke, args[0], **_kind_arg(ev, node))
            return args[0]
        if op == "save":
            saved = self.state.saves.setdefault(node.id, [])
            saved.append(Saved(snapshot(args[0]), args[0], self._step))
            src = node.args[0]
            if isinstance(src, Ref) and src.ref in self.state.positions:
                self.state.positions[node.id] = self.state.positions[src.ref]
            return args[0]
        if op in ops.BINARY_OPS:
            a, b = args[0], args[1]
            # two tensors may broadcast (a[:, None] * b) or multiply out (a @ b)
            both = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
            return _sized(op, ops.BINARY_OPS[op], [a, b], {}, growing=both)
        if op in ops.UNARY_OPS:
            return _sized(op, ops.UNARY_OPS[op], [args[0]], {}, growing=False)
        if op in ops.INPLACE_OPS:
            target = args[0]
            if isinstance(target, torch.Tensor):
                return getattr(target, ops.INPLACE_OPS[op])(args[1])
            return ops.BINARY_OPS[op[1:]](target, args[1])
        if op == "getitem":
            if _advanced_index(args[1]):   # h[idx]: as many rows as the index has
                return _sized("indexing", operator.getitem, args, {})
            return args[0][args[1]]
        if op == "setitem":
            target, key, val = args
            self._setitem(node, target, key, val, ev)
            return target
        if op == "getattr":
            return ops.read_attribute(args[0], kwargs["name"])
        if op == "method":
            name = kwargs.pop("name")
            if name in sizes.PURE_VIEWS or not isinstance(args[0], torch.Tensor):
                return getattr(args[0], name)(*args[1:], **kwargs)
            return _sized(f"method {name}", _method(name), args, kwargs,
                          growing=name in sizes.GROWING_METHODS)
        if op == "call":
            fn = kwargs.pop("fn")
            if fn in ops.CONSTRUCTORS:
                numel = _constructor_numel(fn, args, kwargs)
                if numel > MAX_CONSTRUCTED_NUMEL:
                    raise ValueError(f"{fn} would allocate {numel} elements; the limit is "
                                     f"{MAX_CONSTRUCTED_NUMEL}")
                return ops.TORCH_FUNCTIONS[fn](*args, **kwargs)
            return _sized(fn, ops.TORCH_FUNCTIONS[fn], args, kwargs,
                          growing=fn in sizes.GROWING_FUNCTIONS)
        if op in ops.STEERING_OPS:
            return self._steer(node, args[0], kwargs)
        if op == "call_module":
            modules = self.modules or self._event_modules
            if modules is None:
                raise ValueError("this backend cannot call the model's modules on values")
            return modules(kwargs["module"])(*args, **(kwargs.get("kwargs") or {}))
        if op == "backward":
            # a `with loss.backward():` block reads this backward's gradient alone (as
            # nnsight's hooks on it do): what an earlier backward left in .grad goes
            for ref in self._block_grads.get(node.id, ()):
                value = self.state.env.get(ref)
                if isinstance(value, torch.Tensor):
                    value.grad = None
            args[0].backward(**kwargs)
            return None
        if op == "retain_grad":
            args[0].retain_grad()
            return args[0]
        if op == "requires_grad":
            t = args[0]
            if t.is_leaf:
                t.requires_grad_(True)
            return t
        if op == "stop":
            self._stop = True
            return None
        raise ValueError(f"op {op!r} cannot run here")

    def _setitem(self, node: Node, target: Any, key: Any, val: Any,
                 ev: PointEvent | None) -> None:
        if isinstance(target, (dict, list, tuple)):
            read = self._item_path(node)
            if read is not None:
                self._set_structure_item(node, target, key, val, ev, *read)
                return
        try:
            target[key] = val
        except RuntimeError as exc:
            if isinstance(val, torch.Tensor) and isinstance(target, torch.Tensor):
                region = target[key]
                raise ValueError(
                    f"cannot assign a value of shape {list(val.shape)} to a region of shape "
                    f"{list(region.shape)} of {self._origin(node)} "
                    f"(full shape {list(target.shape)})") from exc
            raise

    def _item_path(self, node: Node) -> tuple[Node, tuple[Any, ...]] | None:
        """For a ``setitem`` whose target is (an item of) a structure read from a point: the
        read node and the keys from the point's value down to the target; ``None`` for a
        target that no point's value holds (a list the graph built)."""
        keys: list[Any] = []
        src = node.args[0]
        while isinstance(src, Ref):
            seen = self._node(src.ref)
            if seen.op == "read":
                return seen, tuple(reversed(keys))
            if seen.op == "getitem":
                keys.append(self._resolve(seen.args[1], None))
            elif seen.op != "save":
                return None
            src = seen.args[0]
        return None

    def _set_structure_item(self, node: Node, target: Any, key: Any, val: Any,
                            ev: PointEvent | None, read: Node, keys: tuple[Any, ...]) -> None:
        """``out["h"] = new`` on a structured value read from a point (a dict, an HF
        ``ModelOutput``, a list or tuple, or an item of one): an assignment of that item of
        the point's value, as a PyTorch hook doing ``out["h"] = new`` makes it.

        Why not ``target[key] = val``: an invoke reads its own copy of the structure (its
        rows of each tensor, in a container built for it), so setting an item of that copy
        changed nothing the model uses. The assignment goes to the event as a structure that
        names only this item (``None`` / absent elsewhere: left as they are), and the copy
        the graph holds gets the item too, so later reads of it agree.
        """
        point = (read.kwargs["module"], read.kwargs["kind"])
        if ev is None or not _at_point(ev, read):
            raise ValueError(
                f"cannot assign an item of {_point_name(point)}: the model is no longer at "
                "that point (assign items in the same step the value was read)")
        if val is None:
            raise ValueError(
                f"cannot set an item of {_point_name(point)} to None; assign a value of the "
                "item's shape, or assign the whole structure (module.output = ...)")
        # the containers from the point's value down to the target, outermost first
        chain = [self.state.env[read.id]]
        for k in keys:
            chain.append(chain[-1][k])
        chain[-1] = target
        path = (*keys, key)
        sparse: Any = val
        for container, k in zip(reversed(chain), reversed(path), strict=True):
            sparse = _sparse_item(container, k, sparse, _point_name(point))
        ev.set(node.invoke, sparse, **_kind_arg(ev, read))
        if not isinstance(target, tuple):
            target[key] = val   # (what later reads of this copy see; a tuple cannot change)

    def _origin(self, node: Node) -> str:
        """The module point a value came from, for error messages."""
        seen = node
        while True:
            if seen.op == "read":
                return _point_name((seen.kwargs["module"], seen.kwargs["kind"]))
            refs = self._refs[seen.id]
            if not refs:
                return "the value"
            seen = self._node(refs[0])

    def _steer(self, node: Node, target: Any, kwargs: dict[str, Any]) -> Any:
        src = node.args[0]
        if not isinstance(target, torch.Tensor):
            raise TypeError(f"{node.op} needs a tensor (e.g. a decoder layer's output), got "
                            f"{type(target).__name__}")
        read = isinstance(src, Ref) and src.ref in self.state.positions
        tokens = self.state.positions[src.ref]() if read else None
        if tokens is not None:
            row_pos, plens = tokens
        elif read or kwargs.get("positions") in (None, "all"):
            # no token positions (a module wrapped with NNsight): positions index dim -2 of
            # the value itself
            row_pos = torch.arange(target.shape[-2]).expand(target.shape[:-1])
            plens = torch.tensor(target.shape[-2])
        else:
            raise ValueError(f"{node.op}(positions=...) needs a module's value directly (e.g. "
                             f"model.layers[i].output), not a value derived from it")
        apply_steering(node.op, target, row_pos, plens, **kwargs)
        return target

    # ----------------------------------------------------------------- results
    def results(self, before_step: int | None = None) -> dict[int, Any]:
        """Saved values by save-node id: one value, or a list (one per step) in scopes.
        ``before_step``: leave out what steps from that one on saved."""
        return collect_results(self.graph, self.state, before_step)


def _sized(what: str, fn: Callable[..., Any], args: list[Any], kwargs: dict[str, Any], *,
           growing: bool = True) -> Any:
    """``fn(*args, **kwargs)`` if what it makes stays within the allocation limit (see
    :mod:`vinterp.ir.sizes`): checked before it runs where its size can be computed, else
    after."""
    known = sizes.check_result_size(what, fn, args, kwargs, growing=growing)
    result = fn(*args, **kwargs)
    if not known:
        sizes.check_result(what, result, args, kwargs)
    return result


def _method(name: str) -> Callable[..., Any]:
    def call(target: Any, *args: Any, **kwargs: Any) -> Any:
        return getattr(target, name)(*args, **kwargs)
    return call


def _advanced_index(key: Any) -> bool:
    """Whether an index key holds a tensor or a list (advanced indexing: the result may be
    larger than the value indexed)."""
    if isinstance(key, (torch.Tensor, list)):
        return True
    return isinstance(key, tuple) and any(isinstance(k, (torch.Tensor, list)) for k in key)


def _sparse_item(container: Any, key: Any, item: Any, where: str) -> Any:
    """A structure like ``container`` that holds ``item`` at ``key`` and nothing else: what
    an event's ``set`` assigns as "this item, the others as they are" (a mapping with that
    key alone, a list or tuple of the same length with ``None`` elsewhere)."""
    if isinstance(container, dict):
        return {key: item}
    n = len(container)
    if isinstance(key, slice):
        indices = range(n)[key]
        items = list(item) if isinstance(item, (list, tuple)) else None
        if items is None or len(items) != len(indices):
            raise ValueError(f"cannot assign {where}[{key.start}:{key.stop}]: give a list of "
                             f"{len(indices)} values")
    elif isinstance(key, int) and -n <= key < n:
        indices, items = range(key % n, key % n + 1), [item]
    else:
        raise ValueError(f"cannot set item {key!r} of {where}: it is a "
                         f"{type(container).__name__} of {n} items")
    out: list[Any] = [None] * n
    for i, v in zip(indices, items, strict=True):
        out[i] = v
    return tuple(out) if isinstance(container, tuple) else out


def _lazy_positions(ev: PointEvent, invoke: int
                    ) -> Callable[[], tuple[torch.Tensor, torch.Tensor] | None]:
    cached: list[tuple[torch.Tensor, torch.Tensor] | None] = []

    def positions() -> tuple[torch.Tensor, torch.Tensor] | None:
        if not cached:
            rows = ev.row_positions(invoke)
            cached.append(None if rows is None else (rows, ev.prompt_lens(invoke)))
        return cached[0]
    return positions


def _at_point(ev: PointEvent | None, node: Node) -> bool:
    if ev is None or ev.module != node.kwargs["module"]:
        return False
    return node.kwargs["kind"] in getattr(ev, "kinds", (ev.kind,))


def _kind_arg(ev: PointEvent, node: Node) -> dict[str, str]:
    return {"kind": node.kwargs["kind"]} if hasattr(ev, "kinds") else {}


def _point_name(point: tuple[str, str]) -> str:
    module, kind = point
    return f"{module or 'model'}.{kind}"


def _describe(node: Node) -> str:
    if node.op in ops.MODULE_OPS:
        return f"call {node.kwargs.get('module')}"
    if node.op in ops.POINT_OPS:
        return f"{node.op} {_point_name((node.kwargs['module'], node.kwargs['kind']))}"
    name = node.kwargs.get("name") or node.kwargs.get("fn")
    return f"{node.op} {name}" if isinstance(name, str) else node.op

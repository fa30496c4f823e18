"""The tracer: records a trace as an intervention graph, runs it, hands back saved values.

Example::

    from vinterp import LanguageModel
    model = LanguageModel("tiny-gpt2")
    with model.trace() as tracer:
        with tracer.invoke("The cat sat on the"):
            cat = model.transformer.h[1].output.save()
        with tracer.invoke("The dog ran through the"):
            model.transformer.h[1].output[:, -1] = cat[:, -1]
            logits = model.logits.save()
    print(logits.shape)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vinterp import ir
from vinterp.backends.base import gc_paused
from vinterp.ir.schema import (
    DictV, DTypeV, EllipsisV, ListV, Node, Ref, SliceV, Steps, TensorRef, TupleV, Value,
)
from vinterp.ir.tensors import dtype_name, encode_tensor
from vinterp.tracing.errors import TracingError
from vinterp.tracing.proxy import Proxy
from vinterp.tracing.rebind import rebind_frame

if TYPE_CHECKING:
    from vinterp.language_model import LanguageModel

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _user_line() -> str | None:
    """``file:line`` of the first frame outside vinterp, for error messages."""
    f: FrameType | None = sys._getframe(2)
    while f is not None and f.f_code.co_filename.startswith(_PACKAGE_DIR):
        f = f.f_back
    if f is None:
        return None
    return f"{os.path.basename(f.f_code.co_filename)}:{f.f_lineno}"


class _StepIter:
    """``tracer.iter[a:b]``: a ``with`` scope, or a loop whose body is traced once."""

    def __init__(self, tracer: Tracer) -> None:
        self._tracer = tracer

    def __getitem__(self, key: slice | int) -> _StepScope:
        if isinstance(key, int):
            return _StepScope(self._tracer, Steps(start=key, stop=key + 1))
        if not isinstance(key, slice) or (key.step not in (None, 1)):
            raise TracingError("tracer.iter takes a step index or a slice like [a:b]")
        start = key.start or 0
        if start < 0 or (key.stop is not None and key.stop <= start):
            raise TracingError(f"tracer.iter[{key.start}:{key.stop}] selects no steps")
        return _StepScope(self._tracer, Steps(start=start, stop=key.stop))


class _StepScope:
    def __init__(self, tracer: Tracer, steps: Steps) -> None:
        self._tracer = tracer
        self._steps = steps
        self._saved: list[Steps] = []

    def __enter__(self) -> _StepScope:
        self._saved.append(self._tracer._steps)
        self._tracer._steps = self._steps
        return self

    def __exit__(self, *exc: Any) -> None:
        self._tracer._steps = self._saved.pop()

    def __iter__(self) -> Iterator[Steps]:
        # nnsight style `for step in tracer.iter[a:b]:` — the body is recorded once and
        # runs at every step of the range.
        with self:
            yield self._steps


class Tracer:
    """Records interventions inside ``with model.trace(...)`` / ``model.generate(...)``."""

    def __init__(self, lm: LanguageModel, mode: str, inputs: Any = None, *,
                 generation: dict[str, Any] | None = None, remote: bool = False,
                 scan: bool = False) -> None:
        if remote:
            raise TracingError(
                "remote=True needs a vinterp server to send the graph to, and this version "
                "has none yet; run locally (remote=False) or use backend='vllm'.")
        self.lm = lm
        self.mode = mode
        self.scan = scan
        self.nodes: list[Node] = []
        self.tensors: list[ir.TensorData] = []
        self._const_ids: dict[int, tuple[torch.Tensor, int]] = {}
        self.invokes: list[tuple[tuple[int, ...], ...]] = []
        self.invoke_generation: dict[int, dict[str, Any]] = {}
        self.saved: list[Proxy] = []
        self.generation = dict(generation or {})
        self.result: list[torch.Tensor] | None = None
        self.finished = False
        self._invoke: int | None = None
        self._invoke_open = False
        self._steps = Steps()
        self._frame: FrameType | None = None
        self._graph: ir.Graph | None = None
        self.iter = _StepIter(self)
        if inputs is not None:
            self.invokes.append(lm._tokenize(inputs))
            self._invoke = 0

    # ------------------------------------------------------------------ recording
    def add(self, op: str, *args: Any, **kwargs: Any) -> Proxy:
        """Record one node and return its proxy (used by proxies and envoys)."""
        if self.finished:
            raise TracingError("this trace has already run; start a new `with model.trace()`")
        node_id = len(self.nodes)
        invoke = self._invoke if self._invoke is not None else -1
        self.nodes.append(Node(
            id=node_id, op=op, args=tuple(self._value(a) for a in args),
            kwargs={k: self._value(v) for k, v in kwargs.items()},
            invoke=invoke, steps=self._steps, line=_user_line(),
        ))
        return Proxy(self, node_id)

    def read(self, module: str, kind: str) -> Proxy:
        """A proxy for a module's value at a point."""
        self._require_invoke(f"{module or 'model'}.{kind}")
        return self.add("read", module=module, kind=kind)

    def write(self, module: str, kind: str, value: Any) -> None:
        """Replace a module's value at a point."""
        self._require_invoke(f"{module or 'model'}.{kind}")
        self.add("write", value, module=module, kind=kind)

    def _require_invoke(self, what: str) -> None:
        if self._invoke is None:
            raise TracingError(
                f"{what} was used outside any invoke; with `model.trace()` and no prompt, "
                "put module accesses inside `with tracer.invoke(prompt):` blocks")

    def describe(self, node_id: int) -> str:
        node = self.nodes[node_id]
        if node.op in ("read", "write"):
            return f"{node.op} {node.kwargs['module'] or 'model'}.{node.kwargs['kind']}"
        name = node.kwargs.get("name") or node.kwargs.get("fn")
        return f"{node.op} {name}" if isinstance(name, str) else node.op

    def _value(self, v: Any) -> Value:
        if isinstance(v, Proxy):
            if v._tracer is not self:
                raise TracingError("a proxy from another trace was used here; .save() it in "
                                   "its own trace and pass the saved tensor instead")
            return Ref(ref=v._id)
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, torch.Tensor):
            return TensorRef(tensor=self._constant(v))
        if isinstance(v, np.ndarray):
            return TensorRef(tensor=self._constant(torch.from_numpy(v)))
        if isinstance(v, (np.integer, np.floating)):
            return v.item()
        if isinstance(v, slice):
            return SliceV(slice=(self._value(v.start), self._value(v.stop), self._value(v.step)))
        if v is Ellipsis:
            return EllipsisV()
        if isinstance(v, torch.Size):
            return TupleV(tuple=tuple(int(s) for s in v))
        if isinstance(v, tuple):
            return TupleV(tuple=tuple(self._value(x) for x in v))
        if isinstance(v, list):
            return ListV(list=tuple(self._value(x) for x in v))
        if isinstance(v, dict):
            return DictV(mapping={str(k): self._value(x) for k, x in v.items()})
        if isinstance(v, torch.dtype):
            return DTypeV(dtype=dtype_name(v))
        if isinstance(v, torch.device):
            return str(v)
        raise TracingError(
            f"a {type(v).__name__} cannot be part of an intervention graph; use tensors, "
            "numbers, strings, slices, lists/tuples/dicts of those, or proxies")

    def _constant(self, t: torch.Tensor) -> int:
        key = id(t)
        hit = self._const_ids.get(key)
        if hit is not None and hit[0] is t:
            return hit[1]
        self.tensors.append(encode_tensor(t))
        self._const_ids[key] = (t, len(self.tensors) - 1)
        return len(self.tensors) - 1

    # ------------------------------------------------------------------ user API
    @contextmanager
    def invoke(self, inputs: Any, **generation: Any) -> Iterator[Tracer]:
        """Add a prompt (or list of prompts, or token ids) to the batch as its own invoke.

        Each invoke's values equal running it alone; later invokes may use earlier ones'.
        In ``generate``, keyword arguments override the generation settings for this invoke
        only, e.g. ``tracer.invoke(prompt, max_new_tokens=16)``.
        """
        if self._invoke_open:
            raise TracingError("tracer.invoke blocks cannot be nested")
        if generation and self.mode != "generate":
            raise TracingError(f"tracer.invoke got {sorted(generation)}: generation settings "
                               "only apply inside model.generate(...)")
        self.invokes.append(self.lm._tokenize(inputs))
        self.invoke_generation[len(self.invokes) - 1] = dict(generation)
        self._invoke = len(self.invokes) - 1
        self._invoke_open = True
        try:
            yield self
        finally:
            # Between and after invoke blocks, code combines invokes' values (global nodes).
            self._invoke_open = False
            self._invoke = None

    def all(self) -> _StepScope:
        """Scope: interventions inside run at every generation step."""
        return _StepScope(self, Steps(start=0, stop=None))

    def next(self, n: int = 1) -> None:
        """Move following interventions to the next generation step."""
        start = self._steps.start + n
        self._steps = Steps(start=start, stop=start + 1)

    def stop(self) -> None:
        """End the forward as soon as everything recorded so far has run."""
        self.add("stop")

    def cache(self, modules: list[Any] | None = None, positions: Any = None) -> dict[str, Any]:
        """Save the outputs of many modules at once (all decoder layers by default).

        Returns a dict keyed by module path; after the block it holds tensors. ``positions``
        (an int, list or slice) keeps only those sequence positions.
        """
        envoys = list(self.lm.layers) if modules is None else list(modules)
        out: dict[str, Any] = {}
        for env in envoys:
            value = env.output
            if positions is not None:
                index = [positions] if isinstance(positions, int) else positions
                value = value[:, index]
            out[env._path] = value.save()
        return out

    # ------------------------------------------------------------------ the graph
    @property
    def graph(self) -> ir.Graph:
        """The intervention graph recorded so far (validated)."""
        if self._graph is not None:
            return self._graph
        return ir.load(self._build())

    def to_json(self, indent: int | None = None) -> str:
        """The graph in its versioned JSON encoding."""
        return ir.dumps(self.graph, indent=indent)

    def _build(self) -> ir.Graph:
        if not self.invokes:
            raise TracingError("nothing to run: pass a prompt to model.trace(...) or add "
                               "`with tracer.invoke(prompt):` blocks")
        return ir.Graph(
            mode="generate" if self.mode == "generate" else "trace",
            invokes=tuple(
                ir.Invoke(prompts=p, generation={
                    k: self._value(v) for k, v in self.invoke_generation.get(i, {}).items()})
                for i, p in enumerate(self.invokes)),
            nodes=tuple(self.nodes), tensors=tuple(self.tensors),
            generation={k: self._value(v) for k, v in self.generation.items()},
        )

    # ------------------------------------------------------------------ running
    def __enter__(self) -> Tracer:
        self.lm._push_tracer(self)
        self._frame = sys._getframe(1)
        # From here to the end of the run the trace allocates an object or more per node and
        # keeps them; see gc_paused for why the cyclic collector waits until it is done.
        self._gc = gc_paused()
        self._gc.__enter__()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.lm._pop_tracer(self)
        try:
            if exc_type is not None:
                self.finished = True
                return
            self._run()
        finally:
            self._gc.__exit__(None, None, None)

    def _run(self) -> None:
        try:
            self._graph = ir.load(self._build())
            backend = self.lm._scan_backend() if self.scan else self.lm._backend
            backend.check(self._graph)
            result = backend.run(self._graph)
        finally:
            self.finished = True
        missing = []
        for proxy in self.saved:
            if proxy._id in result.saves:
                object.__setattr__(proxy, "_value", result.saves[proxy._id])
                object.__setattr__(proxy, "_has_value", True)
            else:
                missing.append(proxy._id)
        self.result = result.generated
        if missing and not any(n.op == "stop" for n in self._graph.nodes):
            # (with tracer.stop(), saves after the stop point are legitimately absent)
            raise TracingError(
                f"the {backend.name} backend returned no value for saved node(s) {missing}; "
                "this is a vinterp bug, please report it with tracer.to_json()")
        if self._frame is not None:
            rebind_frame(self._frame)
            self._frame = None

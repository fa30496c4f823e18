"""The tracer: records a trace as an intervention graph while the user's ``with`` block runs.

When the block ends the recording is built into the graph a backend runs
(:mod:`vinterp.tracing.build`), run, and its saved values handed back
(:mod:`vinterp.tracing.running`).

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

import torch

from vinterp import ir
from vinterp.backends.base import gc_paused
from vinterp.ir import ops
from vinterp.ir.schema import Node, Ref, Steps
from vinterp.ir.validate import node_refs
from vinterp.tracing import mount, running, shapes
from vinterp.tracing.build import build_graph
from vinterp.tracing.cache import Cache, _CacheEntry
from vinterp.tracing.errors import TracingError, not_saved
from vinterp.tracing.generated import _GeneratorEnvoy
from vinterp.tracing.kept import _save_inside
from vinterp.tracing.proxy import Proxy, StepValue
from vinterp.tracing.steps import _StepIter, _StepScope
from vinterp.tracing.values import ir_value

if TYPE_CHECKING:
    from vinterp.language_model import LanguageModel
    from vinterp.tracing.session import RemoteSession

#: what both backends generate when no token budget is given (HF's and vLLM's default)
DEFAULT_MAX_NEW_TOKENS = 20

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


#: source file -> its base name, or None for vinterp's own files (runs for every node)
_FILES: dict[str, str | None] = {}


def _user_line() -> str | None:
    """``file:line`` of the first frame outside vinterp, for error messages."""
    f: FrameType | None = sys._getframe(2)
    while f is not None:
        path = f.f_code.co_filename
        name = _FILES.get(path, "")
        if name == "":
            name = _FILES[path] = None if path.startswith(_PACKAGE_DIR) else \
                os.path.basename(path)
        if name is not None:
            return f"{name}:{f.f_lineno}"
        f = f.f_back
    return None


class Tracer:
    """Records interventions inside ``with model.trace(...)`` / ``model.generate(...)``."""

    def __init__(self, lm: LanguageModel, mode: str, inputs: Any = None, *,
                 generation: dict[str, Any] | None = None, remote: bool = False,
                 scan: bool = False) -> None:
        #: the server's backend for ``remote=True`` (see ``LanguageModel.trace``)
        self.remote: Any = remote or None
        #: the running trace on the server, for ``remote=True, blocking=False``
        self.handle: Any = None
        self.lm = lm
        #: the remote session this trace joins (sent with the others when the session ends)
        session = lm.__dict__.get("_session")
        self._session: RemoteSession | None = \
            session if session is not None and self.remote is session.backend else None
        self._session_refs: dict[tuple[int, int], int] = {}
        self.mode = mode
        self.scan = scan
        self.nodes: list[Node] = []
        self.tensors: list[ir.TensorData] = []
        self._const_ids: dict[int, tuple[torch.Tensor, int]] = {}
        self.invokes: list[tuple[tuple[int, ...], ...]] = []
        self.invoke_generation: dict[int, dict[str, Any]] = {}
        #: invoke index -> each prompt's other per-token model inputs (token_type_ids...)
        self.invoke_token_inputs: dict[int, list[dict[str, torch.Tensor] | None]] = {}
        self.saved: list[Proxy] = []
        self.generation = dict(generation or {})
        self._result: list[torch.Tensor] | None = None
        self.finished = False
        self._invoke: int | None = None
        self._invoke_open = False
        self._steps = Steps()
        #: the step of the `for step in tracer.iter[...]` iteration being recorded, if any
        self._loop_step: int | None = None
        #: step scopes (`with tracer.all()`, step loops) open now
        self._step_scopes = 0
        #: plain objects (``list().save()``) whose proxies are saved and realized after the run
        self._kept: list[Any] = []
        #: nodes computed from the generated ids: run here, after the backend (see running.py)
        self._post: set[int] = set()
        self._generator_node: dict[int, int] = {}
        #: post-run nodes that depend on model.samples: run once per generation step
        self._stepped: set[int] = set()
        #: model.samples reads and views of them (getitem): an in-place edit of one would
        #: change only the ids read back, never the generation, so it is refused
        self._samples_views: set[int] = set()
        #: save nodes at generation steps their invoke never reached (EOS or its own budget)
        self._unreached: set[int] = set()
        #: saved node -> the proxy its name held one step before (``with tracer.all()``)
        self._fallback: dict[int, Proxy] = {}
        self._device_ids: dict[int, int] | None = None
        self._hidden: dict[int, int] = {}
        self._frame: FrameType | None = None
        self._graph: ir.Graph | None = None
        #: trace-time shapes from meta passes: node id -> torch.Size (tensor) or int (length
        #: of a tuple/list value); None: unknown (see known_shape)
        self._shapes: dict[int, Any] = {}
        #: the same, structure only (shapes.Rank for a tensor): for values of later steps
        self._structures: dict[int, Any] = {}
        #: tracer.log(...) calls: printed after the run
        self._logs: list[list[Any]] = []
        #: tracer.cache() results: filled in after the run
        self._caches: list[Cache] = []
        #: caches whose modules are found when the block ends (see cache())
        self._deferred_caches: list[tuple[Cache, int | None, Steps, bool, bool]] = []
        #: the ``with loss.backward():`` blocks open now (innermost last)
        self.backward_blocks: list[Proxy] = []
        self.iter = _StepIter(self)
        if inputs is not None:
            self._add_prompts(inputs)
            self._invoke = 0

    def _add_prompts(self, inputs: Any) -> None:
        """A new invoke's prompts (and the per-token inputs they came with)."""
        rows, token_inputs = self.lm._prompts(inputs)
        if token_inputs is not None:
            self.invoke_token_inputs[len(self.invokes)] = token_inputs
        self.invokes.append(rows)

    # ------------------------------------------------------------------ recording
    def add(self, op: str, *args: Any, **kwargs: Any) -> Proxy:
        """Record one node and return its proxy (used by proxies and envoys)."""
        if self.finished:
            for v in (*args, *kwargs.values()):
                if isinstance(v, Proxy) and v._tracer is self:
                    raise self.unavailable(v._id)
            raise TracingError("this trace has already run; start a new `with model.trace()`")
        node_id = len(self.nodes)
        invoke = self._invoke if self._invoke is not None else -1
        node = Node(
            id=node_id, op=op, args=tuple(ir_value(self, a) for a in args),
            kwargs={k: ir_value(self, v) for k, v in kwargs.items()},
            invoke=invoke, steps=self._steps, line=_user_line(),
        )
        target = node.args[0] if node.args else None
        if isinstance(target, Ref) and target.ref in self._samples_views:
            if ops.is_edit(node):
                from vinterp.tracing.generated import _NO_SAMPLE_WRITES

                raise TracingError(_NO_SAMPLE_WRITES)
            if op == "getitem":
                self._samples_views.add(node_id)
        if self._post and any(r in self._post for r in node_refs(node)):
            if op in ("write", "backward") or ops.is_edit(node) and \
                    self._edits_model(node):
                raise TracingError(
                    "the generated token ids (tracer.result / model.generator.output) exist "
                    "only once generation has ended, so they cannot feed an edit of the model; "
                    "save them, or compute with them after the block")
            self._post.add(node_id)
            if any(r in self._stepped for r in node_refs(node)):
                self._stepped.add(node_id)
        self.nodes.append(node)
        return Proxy(self, node_id)

    def is_post(self, node_id: int) -> bool:
        """Whether a node is computed from the generated ids, here after the generation."""
        return node_id in self._post

    def _edits_model(self, node: Node) -> bool:
        """Whether an in-place ``node`` changes a model value (not only generated ids)."""
        target = node.args[0] if node.args else None
        return not (isinstance(target, Ref) and target.ref in self._post)

    def read(self, module: str, kind: str) -> Proxy:
        """A proxy for a module's value at a point."""
        self._require_invoke(f"{module or 'model'}.{kind}")
        return self.add("read", module=module, kind=kind)

    def call_module(self, module: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Proxy:
        """``model.lm_head(h)``: the model's own module at ``module`` called on values."""
        if not module:
            raise TracingError("calling the whole model on values inside a trace is not "
                               "supported; call a submodule (e.g. model.lm_head(h)), or start "
                               "another trace")
        extra = {"kwargs": dict(kwargs)} if kwargs else {}
        return self.add("call_module", *args, module=module, **extra)

    @property
    def live_tensors(self) -> dict[int, torch.Tensor]:
        """The caller's constants that require grad, by tensor-table index: a local backend
        computes with these very tensors, so a steering vector or probe being trained gets
        its .grad (the graph holds copies: data, not the caller's objects)."""
        return {i: t for t, i in self._const_ids.values() if t.requires_grad}

    def known_shape(self, node_id: int) -> Any:
        """The shape of a node's value, known at trace time without running the weights.

        A meta pass (the model on the meta device, as ``model.scan``) runs the nodes the value
        depends on over this trace's prompts; every tensor among them gets its shape cached.
        Returns a ``torch.Size``, the length of a tuple/list value, a mapping's keys
        (``shapes.Keys``), or ``None`` when the value depends on the generated ids or the
        meta pass cannot run it. A tensor of a generation step after the first (its sequence
        length differs from step to step) gets its rank only (``shapes.Rank``).
        """
        return shapes.known_shape(self, node_id)

    def write(self, module: str, kind: str, value: Any) -> None:
        """Replace a module's value at a point."""
        self._require_invoke(f"{module or 'model'}.{kind}")
        self.add("write", value, module=module, kind=kind)

    def generator_output(self) -> Proxy:
        """The generated token ids (``tracer.result`` / ``model.generator.output``) as a proxy.

        Like HF ``generate``'s return value (and nnsight's): one LongTensor
        ``[prompts, longest prompt + most new tokens]``, each row its prompt then its new
        tokens, padded with the pad id (prompts on the left, early-ending rows on the right);
        inside an invoke, that invoke's prompts only. These values exist once generation has
        ended, so they and whatever is computed from them run here after the backend (see
        :func:`vinterp.tracing.running._run_post`): they can be saved and combined, not
        written into the model.
        """
        if self.finished:
            raise TracingError("this trace has already run; use tracer.result after the block")
        if self.mode != "generate":
            raise TracingError("model.generator.output exists only in model.generate(...); in "
                               "model.trace use model.output (or tracer.result)")
        invoke = self._invoke if self._invoke is not None else -1
        hit = self._generator_node.get(invoke)
        if hit is not None:
            return Proxy(self, hit)
        node_id = len(self.nodes)
        self.nodes.append(Node(id=node_id, op="read", kwargs={"module": "generator",
                                                               "kind": "output"},
                               invoke=invoke, line=_user_line()))
        self._post.add(node_id)
        self._generator_node[invoke] = node_id
        return Proxy(self, node_id)

    def samples_output(self) -> StepValue:
        """``model.samples``: the token ids sampled at the step being recorded, ``[prompts]``
        of this invoke (nnsight's vLLM ``model.samples`` / ``model.samples.output``).

        They are the generated ids at that step, so they are read after the generation (like
        :meth:`generator_output`): save them, combine them, ``.item()`` them; they cannot
        feed an edit of the model. In a step loop (or a ``with tracer.all()`` body, which runs
        once per step) each step's proxy is that step's tokens: append them to a
        ``list().save()`` for one entry per step.
        """
        if self.finished:
            raise TracingError("this trace has already run; use tracer.result after the block")
        if self.mode != "generate":
            raise TracingError(
                "model.samples (the token ids sampled at each step) exists only in a "
                "generation: model.generate(...), or trace(..., max_tokens=N) / "
                "max_new_tokens=N; in a plain model.trace read model.logits")
        invoke = self._invoke if self._invoke is not None else -1
        node_id = len(self.nodes)
        self.nodes.append(Node(id=node_id, op="read", kwargs={"module": "samples",
                                                               "kind": "output"},
                               invoke=invoke, steps=self._steps, line=_user_line()))
        self._post.add(node_id)
        self._stepped.add(node_id)
        self._samples_views.add(node_id)
        return StepValue(self, node_id)

    def keep(self, obj: Any) -> Any:
        """``obj.save()`` on a plain object (``list().save()``): after the block, every proxy
        inside it (appended or set during the trace) holds its value. Returns ``obj``."""
        if self.finished:
            return obj
        if not any(k is obj for k in self._kept):
            self._kept.append(obj)
        return obj

    def _require_invoke(self, what: str) -> None:
        if self._invoke is None:
            raise TracingError(
                f"{what} was used outside any invoke; with `model.trace()` and no prompt, "
                "put module accesses inside `with tracer.invoke(prompt):` blocks")

    def recording_for(self) -> Tracer | None:
        """Where an operation on one of this finished trace's proxies is recorded: the open
        trace of the same remote session (the value crosses as an ``ir.SessionValue``), or
        ``None`` (the proxy is unavailable)."""
        session = self._session
        if session is None or not session.holds(self) or not self.lm._tracers:
            return None
        current = self.lm._tracers[-1]
        return current if current is not self and current._session is session else None

    def describe(self, node_id: int) -> str:
        node = self.nodes[node_id]
        if node.op in ("read", "write"):
            return f"{node.op} {node.kwargs['module'] or 'model'}.{node.kwargs['kind']}"
        name = node.kwargs.get("name") or node.kwargs.get("fn")
        return f"{node.op} {name}" if isinstance(name, str) else node.op

    # ------------------------------------------------------------------ user API
    @contextmanager
    def invoke(self, *inputs: Any, **generation: Any) -> Iterator[Tracer]:
        """Add a prompt (or list of prompts, or token ids) to the batch as its own invoke.

        On ``NNsight`` (nnsight's ``invoke(*args, **kwargs)``) the arguments are the wrapped
        module's, as in ``model.trace(*args, **kwargs)``: ``tracer.invoke(x, mask=m)`` calls
        ``forward(x, mask=m)`` for this invoke's rows.

        Each invoke's values equal running it alone; later invokes may use earlier ones'.
        In ``generate``, keyword arguments override the generation settings for this invoke
        only, e.g. ``tracer.invoke(prompt, max_new_tokens=16)``; sampling arguments in
        ``model.trace`` (``temperature=``, ``max_tokens=``...) make it a generation, as in
        nnsight's vLLM traces. ``tracer.invoke()`` with no prompt (nnsight's empty invoke)
        sees the whole batch: every other invoke's rows, padded to the longest prompt (on the
        left; an encoder's on the right) (hf backend only; on vllm every prompt is its own
        request).
        """
        if self._invoke_open:
            raise TracingError("tracer.invoke blocks cannot be nested")
        given, generation = self.lm._invoke_inputs(inputs, generation)
        if generation and self.mode != "generate":
            if self.lm.backend_name != "vllm" and self.remote is None:
                raise TracingError(
                    f"tracer.invoke got {sorted(generation)}: generation settings only apply "
                    "inside model.generate(...) (or in a trace on the vllm backend, as in "
                    "nnsight's vLLM traces)")
            self.mode = "generate"
            if not any(k in self.generation for k in ("max_new_tokens", "max_tokens")):
                self.generation["max_new_tokens"] = 1   # a trace is one forward
        if given is None:
            self.invokes.append(())
        else:
            self._add_prompts(given)
        self.invoke_generation[len(self.invokes) - 1] = dict(generation)
        self._invoke = len(self.invokes) - 1
        self._invoke_open = True
        # Each invoke counts its own steps from the prompt, as nnsight's per-invoke mediators
        # do: a `tracer.next()` in one invoke must not move the next one (an invoke opened
        # inside a step scope keeps the scope's steps)
        outer = self._steps
        if not self._step_scopes:
            self._steps = Steps()
        try:
            yield self
        finally:
            # Between and after invoke blocks, code combines invokes' values (global nodes).
            self._invoke_open = False
            self._invoke = None
            self._steps = outer

    def barrier(self, n: int) -> _Barrier:
        """nnsight's ``tracer.barrier(n)``: accepted, and calling it does nothing. vinterp needs
        no barrier: invokes run in the order they were written at every point, and a later
        invoke may use an earlier invoke's value directly."""
        if not isinstance(n, int) or n < 1:
            raise TracingError(f"tracer.barrier(n) takes a positive number of blocks, got {n!r}")
        return _Barrier(n)

    def log(self, *values: Any) -> None:
        """nnsight's ``tracer.log(...)``: print values of the run. They are printed when the
        block ends (after the run), in the order the ``log`` calls were written."""
        items = [v.save() if isinstance(v, Proxy) else v for v in values]
        self._logs.append(items)

    @property
    def result(self) -> Any:
        """The generated token ids.

        After the block: one 1-D LongTensor per prompt (prompt then new tokens, no padding);
        ``None`` for ``model.trace``. Inside the block (nnsight's ``tracer.result.save()``): a
        proxy of the ids as HF ``generate`` returns them (see :meth:`generator_output`), or in
        ``model.trace`` the model's output.
        """
        if self.finished:
            return self._result
        if self.mode == "generate":
            return self.generator_output()
        return self.read("", "output")

    @property
    def generator(self) -> _GeneratorEnvoy:
        """``tracer.generator.output``: the same value as ``model.generator.output``."""
        return _GeneratorEnvoy(self)

    def all(self) -> _StepScope:
        """Every generation step, as nnsight's ``tracer.all()`` (= ``tracer.iter[:]``).

        ``for step in tracer.all():`` runs its body once per step with ``step`` an int. The
        block form ``with tracer.all():`` also runs its body once per step (nnsight 0.8.1
        does, verified): an append inside gives one item per step, and a name bound to a
        ``.save()`` inside holds the last step's value after the block. (vinterp used to give
        that name a list of every step's value; it now follows nnsight, so code moved from
        nnsight means the same. Append to a ``list().save()`` for every step.) A body that
        only edits module values (``.steer(v)``, ``x[:] += v``) is recorded once for all
        steps, which is the same thing with one graph node per edit.
        """
        return _StepScope(self, self._steps.start, None)

    def next(self, n: int = 1) -> None:
        """Move following interventions to the next generation step (of this invoke only: the
        next invoke starts again at the prompt, step 0, as in nnsight)."""
        if self._loop_step is not None:
            raise TracingError(
                "tracer.next() inside `for step in tracer.iter[...]`: the loop sets the step "
                "of each iteration itself; use `if step == ...:` or a list of steps instead")
        if self.mode != "generate":
            raise TracingError(
                "tracer.next() moves to the next generation step, and model.trace runs one "
                "forward (step 0); use model.generate(...) for several steps. (A module that "
                "runs more than once in one forward: vinterp reaches its first call only)")
        start = self._steps.start + n
        self._steps = Steps(start=start, stop=start + 1)

    def _step_budget(self) -> tuple[int, str]:
        """How many generation steps can run (the bound of ``tracer.iter[:]``), and why."""
        if self.mode != "generate":
            return 1, "model.trace runs one forward (step 0)"
        invokes = [self._invoke] if self._invoke is not None else list(range(len(self.invokes)))
        budgets = [self._invoke_budget(i) for i in invokes] or [self._invoke_budget(None)]
        return max(budgets), f"this generation has max_new_tokens={max(budgets)}"

    def _unrolled_steps(self, start: int, stop: int | None,
                        indices: list[int] | None) -> list[int]:
        """The steps of ``tracer.iter[start:stop]`` (or ``[indices]``), bounded by the budget."""
        budget, why = self._step_budget()
        steps = indices if indices is not None else list(
            range(start, budget if stop is None else stop))
        past = [s for s in steps if s >= budget]
        if past:
            raise TracingError(
                f"tracer.iter asks for step {max(past)}, but {why}, so steps 0..{budget - 1} "
                f"exist; raise max_new_tokens or iterate over fewer steps")
        return steps

    def _rebound(self, old: Any, new: Any) -> None:
        """A step of a step loop or a ``with tracer.all()`` body rebound a name from ``old`` to
        ``new``: if
        ``new`` is saved at a step its invoke never reaches, the name keeps ``old``'s value."""
        if isinstance(old, Proxy) and isinstance(new, Proxy) and old._tracer is self \
                and new._tracer is self and old._id != new._id:
            self._fallback[new._id] = old

    def _invoke_budget(self, invoke: int | None) -> int:
        settings = {**self.generation, **self.invoke_generation.get(invoke, {})} \
            if invoke is not None else dict(self.generation)
        for key in ("max_new_tokens", "max_tokens"):
            if settings.get(key) is not None:
                return int(settings[key])
        if "max_length" in settings:
            raise TracingError("`for step in tracer.iter[...]` needs the number of new tokens: "
                               "pass max_new_tokens=N instead of max_length")
        return DEFAULT_MAX_NEW_TOKENS

    def stop(self) -> None:
        """End the forward as soon as everything recorded so far has run."""
        self.add("stop")

    def cache(self, modules: list[Any] | None = None, positions: Any = None, *,
              include_output: bool = True, include_inputs: bool = False, **_: Any) -> Any:
        """Save the outputs (and inputs) of many modules at once: nnsight's ``tracer.cache()``.

        Returns a :class:`Cache` keyed as nnsight's, ``"model." + module path``: after the
        block ``cache["model.model.layers.0"].output`` (or ``cache.model.layers[0].output``,
        navigating like the model) holds the value. ``modules``: envoys or paths (every module
        by default). nnsight's ``device=``, ``dtype=``, ``detach=`` are accepted (values stay
        where the model computed them).

        ``positions`` (an int, list or slice; a vinterp extension) keeps only those sequence
        positions of each output and returns a plain dict ``{module path: value}``.

        Called outside the invokes of ``model.trace()`` (as nnsight users often do, before
        them), it caches the whole batch, as a prompt-less ``tracer.invoke()`` sees it.
        """
        if self._invoke is None:
            with self.invoke():
                return self.cache(modules, positions, include_output=include_output,
                                  include_inputs=include_inputs)
        if modules is None:
            if positions is None:
                found = self.lm._cacheable_paths(self)
                if found is None:
                    # which modules run shows only once the inputs are known (a wrapped
                    # module called before its invokes): filled in when the block ends
                    cache = Cache(self.lm)
                    self._deferred_caches.append((cache, self._invoke, self._steps,
                                                  include_inputs, include_output))
                    self._caches.append(cache)
                    return cache
                paths = found
            else:
                paths = [e._path for e in self.lm.layers]
        else:
            paths = [m if isinstance(m, str) else m._path for m in modules]
            paths = [p[len("model."):] if p.startswith("model.") and p not in
                     dict(self.lm._model.named_modules()) else
                     ("" if p == "model" else p) for p in paths]
        if positions is not None:
            out: dict[str, Any] = {}
            index = [positions] if isinstance(positions, int) else positions
            for path in paths:
                out[path] = self.read(path, "output")[:, index].save()
            return out
        cache = Cache(self.lm)
        self._fill_cache(cache, paths, include_inputs, include_output)
        self._caches.append(cache)
        return cache

    def _fill_cache(self, cache: Cache, paths: list[str], include_inputs: bool,
                    include_output: bool) -> None:
        """Record the reads of ``cache``'s modules (in the invoke being recorded)."""
        for path in paths:
            entry = _CacheEntry()
            if include_inputs:
                entry.inputs = self.read(path, "inputs").save()
            if include_output:
                entry.output = self.read(path, "output").save()
            cache[f"model.{path}" if path else "model"] = entry

    def _fill_deferred_caches(self) -> None:
        """The block ended: record the reads of each ``tracer.cache()`` whose modules were
        not known when it was called, in the invoke and steps it was called in (nodes run
        by dataflow, so reads recorded last still run where the model reaches them)."""
        invoke, steps = self._invoke, self._steps
        try:
            for cache, at, at_steps, inputs, output in self._deferred_caches:
                self._invoke, self._steps = at, at_steps
                found = self.lm._cacheable_paths(self)
                paths = found if found is not None else \
                    [name for name, _ in self.lm._model.named_modules()]
                self._fill_cache(cache, paths, inputs, output)
        finally:
            self._invoke, self._steps = invoke, steps
            self._deferred_caches = []

    # ------------------------------------------------------------------ the graph
    @property
    def graph(self) -> ir.Graph:
        """The intervention graph recorded so far (validated)."""
        if self._graph is not None:
            return self._graph
        return ir.load(build_graph(self))

    def to_json(self, indent: int | None = None) -> str:
        """The graph in its versioned JSON encoding."""
        return ir.dumps(self.graph, indent=indent)

    def _save_kept(self) -> None:
        """Save the proxies inside ``list().save()``-kept objects, each at its own step."""
        saved = {p._id for p in self.saved}
        for obj in self._kept:
            _save_inside(obj, self, saved, 0)

    def rebound_after_its_loop(self, proxy: Proxy) -> bool:
        """Whether ``proxy`` is a name a step loop rebound each step, used after the loop."""
        return proxy._id in self._fallback and not self.finished and \
            self.nodes[proxy._id].steps != self._steps

    def save_rebound(self, proxy: Proxy) -> Proxy:
        """``name.save()`` after a step loop that rebound ``name`` each step: every step's
        value is saved at its own step, so after the block the name holds the last step that
        ran (nnsight's loop stops there when generation ends early, at an EOS)."""
        chain = [proxy]
        while chain[-1]._id in self._fallback:
            chain.append(self._fallback[chain[-1]._id])
        saves = [self._save_as_recorded(p) for p in reversed(chain)]   # the first step's first
        for old, new in zip(saves, saves[1:], strict=False):
            self._fallback[new._id] = old
        return saves[-1]

    def _save_as_recorded(self, proxy: Proxy) -> Proxy:
        """``proxy.save()`` in the invoke and steps where ``proxy`` was recorded."""
        node = self.nodes[proxy._id]
        here = (self._invoke, self._steps)
        self._invoke = node.invoke if node.invoke >= 0 else None
        self._steps = node.steps
        try:
            return proxy.save()
        finally:
            self._invoke, self._steps = here

    def unavailable(self, node_id: int) -> TracingError:
        """The error for using the proxy of ``node_id`` after the block."""
        if node_id in self._unreached:
            node = self.nodes[node_id]
            return TracingError(
                f"this value (graph node {node_id}) belongs to generation step "
                f"{node.steps.start}, which never ran: the generation ended earlier (an EOS "
                "token, or a smaller max_new_tokens for its invoke)")
        if self.nodes[node_id].op == "save":
            return TracingError(
                f"this saved value (graph node {node_id}) is held somewhere the block's end "
                "does not rebind (an attribute, `return x.save()` inside the `with`): its "
                "value is `.value` (e.g. obj.h.value), or assign it to a local name inside "
                "the block (h = ....save()) and use h after it")
        return not_saved(node_id)

    # ------------------------------------------------------------------ the with block
    def __enter__(self) -> Tracer:
        self.lm._push_tracer(self)
        mount.push(self)
        self._frame = sys._getframe(1)
        # From here to the end of the run the trace allocates an object or more per node and
        # keeps them; see gc_paused for why the cyclic collector waits until it is done.
        self._gc = gc_paused()
        self._gc.__enter__()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.lm._pop_tracer(self)
        # (before anything else runs: object.save exists only while user code records)
        mount.pop(self)
        try:
            if exc_type is not None:
                self.finished = True
                return
            self._fill_deferred_caches()
            self._save_kept()
            self._run()
        finally:
            self._gc.__exit__(None, None, None)

    def _run(self) -> None:
        # (a method, not running.run itself: EditTracer records an edit instead)
        running.run(self)

    def wait(self, timeout: float | None = None) -> Tracer:
        """``remote=True, blocking=False``: wait for the server's result and fill the saves.

        Example::

            with model.trace(prompt, remote=True, blocking=False) as tracer:
                h = model.layers[8].output.save()
            tracer.wait()
        """
        if self.handle is None:
            raise TracingError("wait() is for traces run with remote=True, blocking=False")
        running.apply_result(self, self.handle.wait(timeout))
        return self


class _Barrier:
    """What ``tracer.barrier(n)`` returns: calling it is a no-op (see :meth:`Tracer.barrier`)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __call__(self) -> None:
        return None

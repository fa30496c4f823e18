"""The Hugging Face backend: runs intervention graphs with forward hooks on an HF model.

Only modules the graph touches get hooks (plus the root, which marks generation steps), so a
trace costs little more than a plain forward. Invokes are packed as left-padded rows (an
encoder's on the right) with true position ids (see :mod:`.batching`); each invoke sees exactly
its own rows (see :mod:`.views`).

Example::

    from vinterp import LanguageModel
    model = LanguageModel("tiny-llama", backend="hf")
    with model.trace("Hello world"):
        h = model.layers[0].output.save()
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from vinterp.backends.base import Backend, RunResult
from vinterp.backends.hf import attention
from vinterp.backends.hf.batching import BatchLayout, TokenFields
from vinterp.backends.hf.views import (
    LeafPath,
    Region,
    assign_at,
    cut,
    cut_tensor,
    leaf_at,
    map_tensors,
)
from vinterp.ir import Graph
from vinterp.ir.errors import NeedsPhases, StopForward
from vinterp.ir.interpreter import GraphRunner
from vinterp.ir.phases import invoke_phases
from vinterp.ir.run_state import RunState, collect_results
from vinterp.ir.tensors import decode_tensor
from vinterp.models.architectures import Architecture

#: generate() names accepted besides HF's own: vLLM SamplingParams spellings.
_VLLM_TO_HF = {"max_tokens": "max_new_tokens", "min_tokens": "min_new_tokens"}
_HF_GENERATE_KEYS = {
    "max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_p", "top_k",
    "repetition_penalty", "num_beams", "seed", "ignore_eos", "eos_token_id",
}


class _Copy(NamedTuple):
    """A tensor handed to one invoke under autograd: its own copy of the invoke's rows, the
    copy's version counter when handed out (a different one later: edited in place), and the
    batch tensor it was cut from."""

    tensor: torch.Tensor
    version: int
    source: torch.Tensor


class _Event:
    """A point reached during the forward: per-invoke views of the batched value."""

    def __init__(self, run: _Run, module: str, kind: str, value: Any) -> None:
        self.run = run
        self.module = module
        self.kind = kind
        # a pre-hook event is both .input and .inputs (one point, two views of it)
        self.kinds = ("input", "inputs") if kind == "inputs" else (kind,)
        self.step = run.step
        self.value = value
        self.replaced = False
        # While autograd records, each invoke gets its own copy of its rows of every tensor in
        # the value (a bare tensor, or each one inside a tuple, dict, ModelOutput or a module's
        # (args, kwargs)). A view of the batch would tie it to the other invokes' views (an
        # in-place edit through one rebuilds the others' autograd history), and it is a side
        # branch of the graph: the model goes on with the batch tensor, so a gradient retained
        # on the view is never filled. The copies are routed back into the batch afterwards
        # (see commit), so edits land and gradients reach them. By invoke, then by the
        # tensor's path in ``value`` (one copy whether read as .input or through .inputs).
        self.handed: dict[int, dict[LeafPath, _Copy]] = {}
        # Without autograd, reads are views of the batch (in-place edits land, for free). An
        # assignment (``.output = new``) must then leave the value those views show alone, as
        # in PyTorch, where a hook returning a new tensor leaves the old one as it was: it
        # writes into a copy, unless the value was already copied by an assignment at this
        # point and no view of its rows was handed out since.
        self._copied = False
        self._exposed: list[slice] = []

    def _dims(self, invoke: int) -> Region:
        layout = self.run.layout
        key_len = layout.width + self.step
        start, stop = layout.window(invoke)
        rows, beams = layout.rows(invoke), self.run.beams
        # beam search runs each layout row as `beams` consecutive rows (HF repeat_interleaves
        # the batch, and reorders beams only within a prompt's rows): the invoke's are those
        rows = slice(rows.start * beams, rows.stop * beams)
        # left padding: the window grows with each generated token
        return Region(rows, start, stop if layout.right else key_len, key_len,
                      layout.input_ids.shape[0] * beams)

    def _base(self, kind: str) -> LeafPath:
        """Where the value read as ``kind`` lies in ``self.value``."""
        if kind == "input":
            return self.run.backend.first_arg_path(self.module, self.value)
        return ()

    def get(self, invoke: int, kind: str = "output") -> Any:
        """The value read as ``kind`` (``output``, ``input``, ``inputs``), cut to ``invoke``."""
        dims = self._dims(invoke)
        base = self._base(kind)
        if not torch.is_grad_enabled():
            self._exposed.append(dims.rows)
            return cut(leaf_at(self.value, base), dims)
        if any(i != invoke for i in self.handed):
            # invokes run in order: one whose rows overlap copies handed out before (a
            # prompt-less invoke spans the batch) reads the batch after their edits, and
            # their copies go back now, so none is later written over its edits
            self.commit(lambda i: i != invoke and _overlap(self._dims(i).rows, dims.rows))
        target = leaf_at(self.value, base)   # (after the commit: it may replace tensors)
        copies = self.handed.setdefault(invoke, {})
        shared = False

        def own(path: LeafPath, leaf: torch.Tensor) -> torch.Tensor:
            nonlocal shared
            view = cut_tensor(leaf, dims)
            if view is leaf or not (leaf.is_floating_point() or leaf.is_complex()):
                # not per example, or the invoke is the whole batch: the tensor itself, which
                # the model goes on with (so it is in the graph already); or one that cannot
                # carry a gradient (token ids, masks, positions): a view has no autograd
                # history to tangle, and edits through it land as without autograd
                shared = True
                return view
            path = (*base, *path)
            copy = copies.get(path)
            if copy is None:
                tensor = view.clone()
                copy = copies[path] = _Copy(tensor, tensor._version, leaf)
            return copy.tensor

        value = map_tensors(target, own)
        if shared or not isinstance(value, torch.Tensor):
            self._exposed.append(dims.rows)
        return value

    def commit(self, which: Callable[[int], bool] = lambda invoke: True) -> None:
        """Route the copies handed out under autograd (those of invokes ``which`` picks) back
        into the batch, and forget them."""
        if not self.handed:
            return
        handed = [(i, path, copy) for i in [i for i in self.handed if which(i)]
                  for path, copy in self.handed.pop(i).items()]
        edited = [(i, path, copy.tensor) for i, path, copy in handed
                  if copy.tensor._version != copy.version]
        kept = [(i, path, copy) for i, path, copy in handed
                if copy.tensor._version == copy.version]
        # edited in place: back in place, as a hook's in-place edit would land, so every
        # reference to this value sees it (a residual its caller keeps), with or without
        # autograd recording. First, so the out-of-place copies below are made after them.
        for invoke, path, tensor in edited:
            self._route(invoke, path, tensor, in_place=True)
        # the others: make the batch depend on each invoke's copy, so copy.grad is filled on
        # backward (values unchanged: out of place, as nothing needs to see it). Only what
        # this point's consumer computes from the value reaches the copy that way; the batch
        # tensor's other uses (a pre-hook's argument is also the residual its caller adds)
        # reach the batch tensor alone, so the copy's gradient is completed from it.
        for invoke, path, copy in kept:
            self._route(invoke, path, copy.tensor, in_place=False)
            _follow_source_grad(copy, self._dims(invoke))

    def _route(self, invoke: int, path: LeafPath, tensor: torch.Tensor, *,
               in_place: bool) -> None:
        where = f"{self.module or 'model'}.{self.kind}"
        self.value = assign_at(self.value, path, tensor, self._dims(invoke), where,
                               not in_place)
        self.replaced = True

    def set(self, invoke: int, new: Any, kind: str = "output") -> None:
        """Assign ``new`` to ``invoke``'s part of the value read as ``kind``."""
        where = f"{self.module or 'model'}.{kind}"
        dims = self._dims(invoke)
        out_of_place = (
            torch.is_grad_enabled() or not self._copied
            or any(_overlap(dims.rows, seen) for seen in self._exposed))
        if out_of_place:
            self._copied, self._exposed = True, []
        copies = self.handed.get(invoke)
        before = {path: leaf_at(self.value, path) for path in copies} if copies else {}
        self.value = assign_at(self.value, self._base(kind), new, dims, where, out_of_place)
        for path, old in before.items():
            # the assignment replaced this tensor: its copy no longer goes back (as with a
            # hook returning a new value, the old one is out of the graph unless the new one
            # was computed from it). Tensors the assignment left alone (an item given as
            # None, a keyword argument not named, .inputs around an .input assignment) keep
            # theirs, routed back in commit.
            if leaf_at(self.value, path) is not old:
                del copies[path]
        self.replaced = True

    def row_positions(self, invoke: int) -> torch.Tensor | None:
        if self.run.backend.feed is not None:
            return None   # the layout's "prompts" are placeholders for the fed inputs
        return self.run.per_beam(self.run.layout.row_positions(invoke, self.step))

    def prompt_lens(self, invoke: int) -> torch.Tensor:
        return self.run.per_beam(self.run.layout.prompt_lens(invoke))


def _overlap(a: slice, b: slice) -> bool:
    return a.start < b.stop and b.start < a.stop


def _follow_source_grad(copy: _Copy, dims: Region) -> None:
    """Make ``copy.tensor.grad`` (when it is retained) the gradient of the batch tensor it was
    cut from, at its region: raw PyTorch's gradient of that value.

    The copy reaches the loss only through the value routed back to the point's consumer
    (``_Event.commit``); the batch tensor also reaches it through every other use, such as
    the residual a decoder layer adds to its ``post_attention_layernorm`` input, so the
    copy's own gradient misses those shares. The batch tensor's gradient is complete once
    computed, which is after the copy's (the copy is computed from it): a hook on it replaces
    what this backward added to the copy's ``.grad`` with the region of the full gradient.
    """
    tensor, source = copy.tensor, copy.source
    if not source.requires_grad:
        return
    before: dict[str, torch.Tensor | None] = {}

    def on_copy(grad: torch.Tensor) -> None:
        # runs before retain_grad adds this backward's share: what earlier backwards left
        before["grad"] = tensor.grad

    def on_source(grad: torch.Tensor) -> None:
        prior = before.pop("grad", tensor.grad)
        if not tensor.retains_grad:
            return
        own = cut_tensor(grad, dims).detach()
        tensor.grad = own.clone() if prior is None else prior + own

    if tensor.requires_grad:
        tensor.register_hook(on_copy)
    source.register_hook(on_source)


class _Run:
    """One forward (or one generate call) of one phase."""

    def __init__(self, backend: HfBackend, runner: GraphRunner, layout: BatchLayout,
                 beams: int = 1) -> None:
        self.backend = backend
        self.runner = runner
        self.layout = layout
        #: rows the model runs per layout row (``num_beams`` of a beam-search generate)
        self.beams = beams
        self.step = 0
        #: while a graph calls one of the model's modules on values (``call_module``), the
        #: hooks stay silent: that call is not the forward reaching the module
        self.calling = 0
        #: (module, kind, step) reached so far: a module run twice in one forward is served
        #: at its first call only, and says so (``_warned``)
        self._reached: set[tuple[str, str, int]] = set()
        self._warned: set[str] = set()
        #: the point the forward is at (module, kind); None at the end of a step
        self.point: tuple[str, str] | None = None

    def per_beam(self, rows: torch.Tensor) -> torch.Tensor:
        """Per-row values of the layout (positions, prompt lengths) for the rows the model
        runs: each repeated for its beams."""
        return rows.repeat_interleave(self.beams, dim=0) if self.beams > 1 else rows

    def call_module(self, path: str) -> Any:
        """``path``'s module as a callable for ``call_module`` nodes (hooks muted inside)."""
        module = self.backend.paths[path]

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calling += 1
            try:
                return module(*args, **kwargs)
            finally:
                self.calling -= 1
        return call

    def event(self, module: str, kind: str, value: Any) -> Any:
        reached = (module, kind, self.step)
        if reached in self._reached and module and module not in self._warned:
            self._warned.add(module)
            warnings.warn(
                f"{module} ran more than once in one forward (a shared or reused module): "
                f"vinterp reads and edits its first call only; later calls run unchanged",
                stacklevel=2)
        self._reached.add(reached)
        ev = _Event(self, module, kind, value)
        self.point = (module, kind)
        self.runner.on_event(ev)
        ev.commit()
        return ev


class HfBackend(Backend):
    """Executes graphs on a ``transformers`` causal LM through hooks."""

    name = "hf"

    def __init__(self, model: nn.Module, architecture: Architecture | None, pad_id: int,
                 eos_id: int | None = None, *, scan: bool = False,
                 feed: Callable[..., tuple[tuple[Any, ...], dict[str, Any]]] | None = None
                 ) -> None:
        self.model = model
        #: how invokes become the model's arguments: ``feed(prompts_by_invoke, invokes,
        #: device) -> (args, kwargs)`` (``NNsight``: any inputs); ``None``: the prompts are
        #: token ids, run as left-padded ``input_ids`` (see :mod:`.batching`)
        self.feed = feed
        # scan: the model lives on the meta device; only shapes flow, so the attention mask
        # (whose creation inspects values) is left out
        self.scan = scan
        self.arch = architecture
        self.pad_id = pad_id
        self.eos_id = eos_id
        self.paths = {name: mod for name, mod in model.named_modules()}
        self._first_params: dict[str, str] = {}
        #: the model attends both ways (BERT and the like): traces pad its prompts on the
        #: right (see :mod:`.batching`)
        self.encoder = attends_both_ways(model)
        #: a model numbering positions from its padding_idx + 1 (RoBERTa): that index
        self._padding_idx = padding_idx_positions(model)

    # ------------------------------------------------------------------ token inputs
    @staticmethod
    def _fields_of(graph: Graph) -> list[list[TokenFields]] | None:
        """Each invoke's prompts' other per-token inputs (``ir.Invoke.token_inputs``), or
        ``None`` where no prompt has any."""
        if not any(inv.token_inputs for inv in graph.invokes):
            return None
        tensors: dict[int, torch.Tensor] = {}

        def value(ref: int) -> torch.Tensor:
            if ref not in tensors:
                tensors[ref] = decode_tensor(graph.tensors[ref])
            return tensors[ref]

        return [[{k: value(r.tensor) for k, r in given.items()} or None
                 for given in (inv.token_inputs or ({},) * len(inv.prompts))]
                for inv in graph.invokes]

    # ------------------------------------------------------------------ .input
    def _first_param(self, module: str) -> str:
        name = self._first_params.get(module)
        if name is None:
            forward = (self.model if module == "" else self.paths[module]).forward
            params = list(inspect.signature(forward).parameters)
            name = self._first_params[module] = params[0] if params else ""
        return name

    def first_arg_path(self, module: str, inputs: tuple[tuple[Any, ...], dict[str, Any]]
                       ) -> LeafPath:
        """Where a module's ``.input`` lies in its ``(args, kwargs)``: the first positional
        argument, else its forward's first parameter when passed by keyword (HF layers get
        ``hidden_states=`` first anyway), else the first keyword argument passed (nnsight's
        rule: the first argument given, whatever the signature says first)."""
        args, kwargs = inputs
        if args:
            return (0, 0)
        name = self._first_param(module)
        if name not in kwargs and kwargs:
            # the signature's first parameter was left out (``forward(self, mask=None,
            # hidden=None)`` called as ``sub(hidden=x)``) or is ``*args``: reading it would
            # give None, and assigning it would add an argument the forward ignores
            name = next(iter(kwargs))
        return (1, name)

    @property
    def device(self) -> torch.device:
        for tensor in (*self.model.parameters(), *self.model.buffers()):
            return tensor.device
        return torch.device("cpu")   # a module without weights (NNsight)

    def _needs_eager(self, graph: Graph) -> bool:
        drop = self.arch.attn_dropout if self.arch else None
        for n in graph.nodes:
            if n.op in ("read", "write"):
                m = n.kwargs["module"]
                if m.endswith(".probs") or (drop and m.endswith(f".{drop}")):
                    return True
        return False

    def check(self, graph: Graph) -> None:
        for n in graph.nodes:
            if n.op == "call_module":
                m = n.kwargs["module"]
                if m not in self.paths or m == "":
                    raise AttributeError(f"the model has no module {m!r} to call")
            if n.op in ("read", "write"):
                m = n.kwargs["module"]
                base = m[: -len(".probs")] if m.endswith(".probs") else m
                if base not in self.paths:
                    raise AttributeError(f"the model has no module {base!r}")

    # ------------------------------------------------------------------ hooks
    @contextlib.contextmanager
    def _hooks(self, run: _Run, graph: Graph, eager: bool) -> Iterator[None]:
        """Hooks on the root and on every module the graph touches, for one run."""
        handles = []
        points: dict[str, set[str]] = {}
        for n in graph.nodes:
            if n.op in ("read", "write"):
                points.setdefault(n.kwargs["module"], set()).add(n.kwargs["kind"])

        def pre_hook(path: str) -> Any:
            def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
                if run.calling:
                    return None
                if path == "":
                    run.runner.begin_step(run.step)
                ev = run.event(path, "inputs", (args, kwargs))
                return ev.value if ev.replaced else None
            return hook

        def post_hook(path: str) -> Any:
            def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                     output: Any) -> Any:
                if run.calling:
                    return None
                ev = run.event(path, "output", output)
                if path == "":
                    run.point = None
                    run.runner.end_step()
                    run.step += 1
                return ev.value if ev.replaced else None
            return hook

        handles.append(self.model.register_forward_pre_hook(pre_hook(""),
                                                            with_kwargs=True))
        handles.append(self.model.register_forward_hook(post_hook(""), with_kwargs=True))
        probs: dict[int, str] = {}
        for path, kinds in points.items():
            if path == "":
                continue
            if path.endswith(".probs"):
                probs[id(self.paths[path[: -len(".probs")]])] = path
                continue
            module = self.paths[path]
            if kinds & {"input", "inputs"}:
                handles.append(module.register_forward_pre_hook(pre_hook(path),
                                                                with_kwargs=True))
            if "output" in kinds:
                handles.append(module.register_forward_hook(post_hook(path), with_kwargs=True))

        def on_probs(module: nn.Module, weights: torch.Tensor) -> torch.Tensor:
            path = probs.get(id(module))
            if path is None or run.calling:
                return weights
            ev = run.event(path, "output", weights)
            return ev.value

        config = getattr(self.model, "config", None)   # None: not an HF model (NNsight)
        previous = getattr(config, "_attn_implementation", None)
        token = attention.probs_callback.set(on_probs if probs else None)
        if eager and config is not None:
            config._attn_implementation = attention.IMPLEMENTATION
        try:
            yield
        finally:
            if config is not None and eager:
                config._attn_implementation = previous
            attention.probs_callback.reset(token)
            for h in handles:
                h.remove()

    # ------------------------------------------------------------------ running
    def run(self, graph: Graph, *, live: Mapping[int, torch.Tensor] | None = None
            ) -> RunResult:
        state = RunState()
        fields = self._fields_of(graph)
        try:
            generated = self._run_phase(graph, state, None, live, fields)
        except NeedsPhases:
            if any(not inv.prompts for inv in graph.invokes):
                raise ValueError(
                    "a prompt-less tracer.invoke() (the whole batch) cannot be combined with "
                    "invokes that use values computed later by other invokes; move the "
                    "cross-invoke code into the invokes themselves") from None
            state = RunState()
            generated = [None] * sum(len(inv.prompts) for inv in graph.invokes)
            for group in invoke_phases(graph):
                try:
                    out = self._run_phase(graph, state, group, live, fields)
                except NeedsPhases as exc:
                    # the planner put an invoke in this phase with one whose value it needs
                    # later in the forward (a dependency it did not see): rerunning cannot
                    # help, and NeedsPhases is control flow, empty for the user
                    raise _unphased_error(group, exc) from None
                if out is not None:
                    layout_rows = _rows_of(graph, group)
                    for row, ids in zip(layout_rows, out, strict=True):
                        generated[row] = ids
            if graph.mode != "generate":
                generated = None
        saves = collect_results(graph, state)
        if generated is not None:
            rows = iter(generated)
            steps = {}
            for i, inv in enumerate(graph.invokes):
                ids = [next(rows) for _ in inv.prompts]
                steps[i] = max((len(t) - len(p) for t, p in zip(ids, inv.prompts, strict=True)),
                               default=-1)
            longest = max(steps.values(), default=0)
            steps = {i: longest if n < 0 else n for i, n in steps.items()}
            trim_steps(graph, saves, steps)
        return RunResult(saves=saves, generated=generated)

    def _run_phase(self, graph: Graph, state: RunState, invokes: list[int] | None,
                   live: Mapping[int, torch.Tensor] | None = None,
                   fields: list[list[TokenFields]] | None = None
                   ) -> list[torch.Tensor] | None:
        runner = GraphRunner(graph, state=state, active_invokes=invokes, live=live)
        prompts = [inv.prompts for inv in graph.invokes]
        layout = BatchLayout.build(prompts, self.pad_id, invokes,
                                   right=self.encoder and graph.mode == "trace",
                                   fields_by_invoke=fields)
        beams = 1
        if graph.mode == "generate" and not self.scan:
            beams = max(1, int(graph.generation.get("num_beams") or 1))
        run = _Run(self, runner, layout, beams)
        runner.modules = run.call_module
        device = self.device
        grad = torch.enable_grad() if runner.wants_grad else torch.no_grad()
        with self._hooks(run, graph, self._needs_eager(graph)), grad:
            try:
                if graph.mode == "generate" and not self.scan:
                    if self.feed is not None:
                        raise ValueError("generate() needs a language model (token ids); "
                                         "this model takes other inputs: use trace()")
                    return self._generate(graph, layout, device)
                if self.feed is not None:
                    args, kwargs = self.feed(prompts, invokes, device)
                    self.model(*args, **kwargs)
                    return None
                mask = None if self.scan else layout.attention_mask.to(device)
                extra = self._first_step_kwargs() if graph.mode == "generate" else {}
                extra.update({k: v.to(device) for k, v in layout.fields.items()})
                positions = self._position_ids(layout)
                if positions is not None:
                    extra["position_ids"] = positions.to(device)
                self.model(input_ids=layout.input_ids.to(device), attention_mask=mask,
                           **extra)
            except StopForward:
                pass
            except NeedsPhases as exc:
                exc.args = (run.point,)   # where the forward was, for the user's message
                raise
        return None

    def _position_ids(self, layout: BatchLayout) -> torch.Tensor | None:
        """The ``position_ids`` a forward gets: ``None`` (the model's own) with pads on the
        right, where a row's positions are those of its prompt alone in every model; with
        pads on the left, each row's own count from its first real token, by the model's
        rule (see :func:`padding_idx_positions`), as the model would number the prompt
        alone."""
        if layout.right:
            return None
        if self._padding_idx is None:
            return layout.position_ids
        # the model's own rule (create_position_ids_from_input_ids), which also skips a real
        # token whose id is padding_idx, on each row's real tokens: the left pads (whatever
        # their id) add nothing to the count, as in the prompt alone
        idx = self._padding_idx
        counted = (layout.attention_mask.bool() & (layout.input_ids != idx)).long()
        return counted.cumsum(-1) * counted + idx

    def _first_step_kwargs(self) -> dict[str, Any]:
        """A generation's first forward as HF generate makes it (the scan backend runs only
        that step: meta tensors cannot be sampled): logits for the last position only, where
        the model supports that."""
        params = inspect.signature(self.model.forward).parameters
        return {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def _generate(self, graph: Graph, layout: BatchLayout, device: torch.device
                  ) -> list[torch.Tensor]:
        kwargs = _generation_kwargs(graph)
        # per-invoke token budgets: generate to the largest, then cut each row to its own
        row_limit = [0] * layout.input_ids.shape[0]
        for i, rows in layout.invoke_rows.items():
            if not graph.invokes[i].prompts:
                continue   # the whole batch: each row keeps its own invoke's budget
            limit = _invoke_max_new_tokens(graph, i, kwargs["max_new_tokens"])
            for b in range(rows.start, rows.stop):
                row_limit[b] = limit
        kwargs["max_new_tokens"] = max(row_limit)
        seed = kwargs.pop("seed", None)
        if seed is not None:
            torch.manual_seed(int(seed))
        if kwargs.pop("ignore_eos", False):
            kwargs["eos_token_id"] = None
        fields = {k: v.to(device) for k, v in layout.fields.items()}
        out = self.model.generate(
            input_ids=layout.input_ids.to(device),
            attention_mask=layout.attention_mask.to(device),
            pad_token_id=self.pad_id, **fields, **kwargs,
        )
        eos = kwargs["eos_token_id"] if "eos_token_id" in kwargs else self.eos_id
        if eos is not None:
            eos = torch.as_tensor(eos).reshape(-1)   # one id or HF's list of ids
        width = layout.width
        result = []
        for b in range(out.shape[0]):
            prompt = out[b, width - int(layout.lengths[b]):width]
            new = out[b, width:width + row_limit[b]]
            if eos is not None:
                hits = torch.isin(new, eos.to(new.device)).nonzero()
                if len(hits):
                    new = new[: int(hits[0]) + 1]
            result.append(torch.cat([prompt, new]).cpu())
        return result


def attends_both_ways(model: nn.Module) -> bool:
    """Whether ``model`` is an encoder (traces pad it on the right).

    Its attention modules all say ``is_causal = False`` (BERT, RoBERTa...); a model with any
    causal attention (a decoder, also one with a vision tower) is not. Where no module says
    (DeBERTa-v2 and MPNet have no such flag, Mamba has no attention), a model that cannot
    generate and is not configured as a decoder is taken for an encoder: left padding would
    put a pad where it reads ``[CLS]`` (column 0). A causal model taken for one by this rule
    (a base Mamba) still gives each prompt's own values: its real tokens never see the pads
    on their right.
    """
    flags = {m.is_causal for m in model.modules() if isinstance(getattr(m, "is_causal", None),
                                                                 bool)}
    if flags:
        return flags == {False}
    config = getattr(model, "config", None)
    can_generate = getattr(model, "can_generate", None)
    if config is None or not callable(can_generate):
        return False   # not an HF model: nothing says it is an encoder
    return not can_generate() and not getattr(config, "is_decoder", False)


def padding_idx_positions(model: nn.Module) -> int | None:
    """``padding_idx`` of a model that numbers positions from ``padding_idx + 1`` (RoBERTa,
    XLM-R, CamemBERT, MPNet, ESM...: their embeddings compute ``padding_idx + 1 + k`` for the
    k-th real token, ``padding_idx`` for pads, when no ``position_ids`` are given); ``None``
    for a model that counts from 0. Recognised by an embeddings module whose
    ``position_embeddings`` table has that module's ``padding_idx``."""
    for module in model.modules():
        idx = getattr(module, "padding_idx", None)
        table = getattr(module, "position_embeddings", None)
        if isinstance(idx, int) and isinstance(table, nn.Embedding) \
                and table.padding_idx == idx:
            return idx
    return None


def _unphased_error(group: list[int], exc: NeedsPhases) -> ValueError:
    """The user's error for a cross-invoke dependency that phases could not serve."""
    point = exc.args[0] if exc.args else None
    if point is not None:
        module, kind = point
        what = f"the edit of {module or 'model'}.{'input' if kind == 'inputs' else kind}"
    else:
        what = "a value"
    return ValueError(
        f"this trace cannot run: {what} (in invokes {group}, counted from 0 as written) needs "
        "a value that another invoke computes later in the same forward, and vinterp could "
        "not order the invokes into forwards (phases) that compute it first. This happens "
        "when a value combining invokes is computed between invokes (outside any `with "
        "tracer.invoke(...)`) from values at later layers and used to edit an earlier "
        "layer. Compute the cross-invoke value inside the invoke that uses it: move e.g. "
        "`diff = a - b` into the `with tracer.invoke(...)` block that makes the edit.")


def _rows_of(graph: Graph, group: list[int]) -> list[int]:
    starts, pos = [], 0
    for inv in graph.invokes:
        starts.append(pos)
        pos += len(inv.prompts)
    return [starts[i] + k for i in group for k in range(len(graph.invokes[i].prompts))]


def _invoke_max_new_tokens(graph: Graph, invoke: int, default: int) -> int:
    """An invoke's own token budget (the only per-invoke setting batched HF generate has)."""
    own = {_VLLM_TO_HF.get(k, k): v for k, v in graph.invokes[invoke].generation.items()}
    other = sorted(set(own) - {"max_new_tokens"})
    if other:
        raise ValueError(f"tracer.invoke(..., {', '.join(other)}=...): per-invoke settings "
                         "other than max_new_tokens need backend='vllm'")
    return int(own.get("max_new_tokens", default))


def trim_steps(graph: Graph, saves: dict[int, Any], new_tokens: dict[int, int]) -> None:
    """Cut per-step save lists to the steps each invoke really ran (its own budget or EOS).

    Batched generation keeps computing rows whose sequence has ended; a request that runs
    alone (or in vLLM) stops there, so those steps are not part of its result.
    """
    for node in graph.nodes:
        if node.op != "save" or node.id not in saves or node.invoke not in new_tokens:
            continue
        values = saves[node.id]
        if isinstance(values, list) and (node.steps.stop is None
                                         or node.steps.stop - node.steps.start > 1):
            saves[node.id] = values[: max(0, new_tokens[node.invoke] - node.steps.start)]


def _generation_kwargs(graph: Graph) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for key, value in graph.generation.items():
        key = _VLLM_TO_HF.get(key, key)
        if key not in _HF_GENERATE_KEYS:
            raise ValueError(f"generate() got {key!r}, which the hf backend does not take; "
                             f"supported: {sorted(_HF_GENERATE_KEYS | set(_VLLM_TO_HF))}")
        kwargs[key] = value
    kwargs.setdefault("max_new_tokens", 20)
    if kwargs.get("temperature") == 0:   # vLLM's spelling of greedy
        kwargs.pop("temperature")
        kwargs["do_sample"] = False
    if not kwargs.get("do_sample", False):
        if kwargs.get("temperature") is not None and "do_sample" not in kwargs:
            # HF generate ignores it without do_sample=True (greedy), where vLLM samples at
            # that temperature: the same trace would give other tokens on the two backends
            warnings.warn(
                f"temperature={kwargs['temperature']} without do_sample=True is greedy on the "
                "hf backend (as in HF generate) but samples on the vllm backend; pass "
                "do_sample=True to sample on both, or drop temperature", stacklevel=2)
        kwargs["do_sample"] = False
        kwargs.setdefault("temperature", None)
        kwargs.setdefault("top_p", None)
        kwargs.setdefault("top_k", None)
    return kwargs

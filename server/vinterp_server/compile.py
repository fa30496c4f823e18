"""HTTP intervention fields → the library's IR, checked before anything reaches the engine.

The server never imports the tracing front end: ``interventions`` and ``capture`` compile
straight to IR nodes (the same ``steer``/``read``/``getitem``/``save`` nodes a trace makes), and
``graph`` is loaded by the one IR validator. :class:`CompiledRequest` keeps the checked,
prompt-independent part; :meth:`CompiledRequest.graph_for` adds a prompt when vLLM's
renderer has made its token ids.

Bad input raises :class:`FieldError` naming the field (the app answers 400).

Example::

    stored = {name: vectors_of(name) for name in vector_names(fields)}   # fetched first
    spec = CompiledRequest.build(fields, model, vectors=stored.get)
    graph = spec.graph_for([1, 2, 3])
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vinterp.ir.jsonform import node_json
from vinterp.ir import Graph, GraphError, Invoke, Node, Ref, SliceV, Steps, TupleV, load
from vinterp.ir.schema import ListV, NamedTensor, TensorRef
from vinterp.ir.tensors import encode_tensor, torch_dtype
from vinterp.models.architectures import Architecture
from vinterp.models.meta import unknown_module
from vinterp_server.schemas import Capture, Intervention, InterventionFields, VectorSpec

#: steps a spec word selects: [start, stop) of generation steps (step 0 is the prompt)
_STEPS = {"prompt": Steps(start=0, stop=1), "generated": Steps(start=1, stop=None),
          "all": Steps(start=0, stop=None)}
#: the op's keyword holding its vector
_VECTOR_KW = {"steer": "vector", "replace": "vector", "ablate": "direction",
              "clamp": "direction"}


class FieldError(ValueError):
    """A request field is wrong; ``field`` names it (e.g. ``interventions[0].layers``)."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass(frozen=True)
class ModelInfo:
    """What compiling needs to know about the served model."""

    arch: Architecture
    num_layers: int
    hidden_size: int
    dtype: torch.dtype
    vocab_size: int = 0   # (the width of logits captures; 0: unknown, sized as hidden)
    #: the HF model's module paths (``models.meta.module_names``; empty: not checked)
    modules: frozenset[str] = frozenset()


VectorLookup = Callable[[str], dict[int | None, torch.Tensor] | None]


def vector_names(source: InterventionFields | Graph) -> list[str]:
    """The stored vectors ``source`` uses by name, in the order compiling meets them. Compiling
    is synchronous, and a shared store is not: the caller fetches these first and compiles
    with a lookup into what it fetched."""
    if isinstance(source, Graph):
        names = [t.named for t in source.tensors if isinstance(t, NamedTensor)]
    else:
        names = [iv.vector.name for iv in source.interventions or ()
                 if iv.vector is not None and iv.vector.name is not None]
        # the graph field is JSON until build() loads it; its named tensors have "named"
        names += [t["named"] for t in (source.graph or {}).get("tensors") or ()
                  if isinstance(t, dict) and isinstance(t.get("named"), str)]
    return list(dict.fromkeys(names))


def parse_point(text: str, model: ModelInfo) -> tuple[str, str]:
    """``layers.8.mlp.output`` / ``model.layers.8.output`` / ``embed.output`` → (module, kind).

    Example::

        >>> from vinterp.models.architectures import for_model_type
        >>> m = ModelInfo(for_model_type("llama"), 30, 576, torch.float32)
        >>> parse_point("layers.8.mlp.output", m)
        ('model.layers.8.mlp', 'output')
    """
    module, _, kind = text.rpartition(".")
    if kind not in ("output", "input") or not module:
        raise ValueError(f"point {text!r} must end in .output or .input "
                         f"(e.g. layers.8.output)")
    arch = model.arch
    head, _, rest = module.partition(".")
    if head == "layers":
        idx, _, sub = rest.partition(".")
        if not idx.lstrip("-").isdigit():
            raise ValueError(f"point {text!r}: expected layers.<index>...")
        module = arch.layer(_layer(int(idx), model))
        if sub:
            module += "." + arch.layer_aliases().get(sub, sub)
    elif head in arch.aliases() and not rest:
        module = arch.aliases()[head]
    else:
        prefix = arch.layers + "."
        if module.startswith(prefix):
            # checked as the short form is above: int() would answer with Python's own
            # "invalid literal for int()" message, which does not say what a point looks like
            idx = module[len(prefix):].split(".")[0]
            if not idx.lstrip("-").isdigit():
                raise ValueError(f"point {text!r}: expected {prefix}<index>... with a layer "
                                 f"number after {prefix!r} (e.g. {prefix}8.output or "
                                 f"layers.8.output), got {idx!r}")
            _layer(int(idx), model)
    missing = unknown_module(module, model.modules, arch.layers)
    if missing is not None:
        raise ValueError(f"point {text!r}: {missing}")
    from vinterp_vllm.points import resolve_point  # validates the point on the vLLM model

    resolve_point(arch, module, kind)
    return module, kind


def _layer(i: int, model: ModelInfo) -> int:
    n = model.num_layers
    if not -n <= i < n:
        raise ValueError(f"layer {i} is out of range: the model has {n} layers (0..{n - 1})")
    return i % n


def _layers(spec: int | list[int] | str, model: ModelInfo) -> list[int]:
    if spec == "all":
        return list(range(model.num_layers))
    items = [spec] if isinstance(spec, int) else list(spec)  # type: ignore[list-item]
    if not items:
        raise ValueError("give at least one layer")
    return [_layer(i, model) for i in items]


def decode_vector(spec: VectorSpec, hidden: int) -> torch.Tensor:
    """An inline vector (``values`` or ``base64``) as a float tensor, checked."""
    if spec.values is not None:
        t = torch.tensor(spec.values, dtype=torch.float32)
    else:
        try:
            raw = base64.b64decode(spec.base64 or "", validate=True)
            t = torch.frombuffer(bytearray(raw), dtype=torch_dtype(spec.dtype)).float()
        except Exception as exc:
            raise ValueError(f"base64 is not {spec.dtype} bytes: {exc}") from None
    return check_vector(t, hidden)


def check_vector(t: torch.Tensor, hidden: int) -> torch.Tensor:
    """``t`` as a 1-D float tensor of the model's hidden size with finite values."""
    if t.dim() != 1 or t.numel() != hidden:
        raise ValueError(f"a vector must have the model's hidden size {hidden}; "
                         f"got shape {list(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError("the vector has NaN or inf values")
    return t.float()


@dataclass
class CompiledRequest:
    """A request's checked interventions and captures, waiting for its prompt tokens."""

    model: ModelInfo
    nodes: list[dict[str, Any]] = field(default_factory=list)   # IR nodes without invoke
    tensors: list[torch.Tensor] = field(default_factory=list)
    captures: list[tuple[int, Capture | None, str]] = field(default_factory=list)
    user_graph: Graph | None = None
    ops: dict[str, int] = field(default_factory=dict)   # interventions by op (for metrics)
    #: (field name, absolute positions) checked against each prompt (see check_prompt)
    positions: list[tuple[str, tuple[int, ...], bool]] = field(default_factory=list)
    #: save nodes of captures whose rows are logits (vocabulary-wide, not hidden-wide)
    wide_saves: set[int] = field(default_factory=set)

    @classmethod
    def build(cls, fields: InterventionFields, model: ModelInfo, *,
              vectors: VectorLookup) -> CompiledRequest:
        """Check ``fields`` and compile them; raises :class:`FieldError`."""
        spec = cls(model)
        for k, iv in enumerate(fields.interventions or ()):
            try:
                spec._intervention(iv, vectors)
            except FieldError as exc:
                raise FieldError(f"interventions[{k}].{exc.field}", str(exc).split(": ", 1)[1])
            except (ValueError, KeyError) as exc:
                raise FieldError(f"interventions[{k}]", _msg(exc)) from None
            if isinstance(iv.positions, list):
                spec.positions.append((f"interventions[{k}].positions", tuple(iv.positions),
                                       True))
        for k, cap in enumerate(fields.capture or ()):
            try:
                spec._capture(cap)
            except (ValueError, KeyError) as exc:
                raise FieldError(f"capture[{k}]", _msg(exc)) from None
            if isinstance(cap.positions, list):
                spec.positions.append((f"capture[{k}].positions", tuple(cap.positions), False))
        if fields.graph is not None:
            spec._graph(fields.graph, vectors)
        return spec

    # ------------------------------------------------------------------ compile
    def _add(self, op: str, *args: Any, steps: Steps, **kwargs: Any) -> int:
        nid = len(self.nodes)
        self.nodes.append({"id": nid, "op": op, "args": args, "kwargs": kwargs,
                           "steps": steps})
        return nid

    def _tensor(self, t: torch.Tensor) -> TensorRef:
        self.tensors.append(t.to(self.model.dtype))
        return TensorRef(tensor=len(self.tensors) - 1)

    def _intervention(self, iv: Intervention, vectors: VectorLookup) -> None:
        try:
            layers = _layers(iv.layers, self.model)
        except ValueError as exc:
            raise FieldError("layers", str(exc)) from None
        per_layer: dict[int | None, torch.Tensor] = {}
        if iv.vector is not None:
            per_layer = self._vectors(iv.vector, vectors)
        for i in layers:
            read = self._add("read", steps=_STEPS["all"], module=self.model.arch.layer(i),
                             kind="output")
            kwargs: dict[str, Any] = {"positions": iv.positions if isinstance(
                iv.positions, str) else ListV(list=tuple(iv.positions))}
            if iv.op in _VECTOR_KW:
                vec = per_layer.get(i, per_layer.get(None))
                if vec is None:
                    raise FieldError("vector", f"the named vector {iv.vector.name!r} has no "  # type: ignore[union-attr]
                                               f"entry for layer {i}")
                if iv.op in ("ablate", "clamp") and not bool(vec.abs().sum() > 0):
                    raise FieldError("vector", f"{iv.op} projects onto the vector's direction, "
                                               f"and this vector (layer {i}) is all zeros")
                kwargs[_VECTOR_KW[iv.op]] = self._tensor(vec)
            if iv.op == "steer":
                kwargs["scale"] = iv.scale
            elif iv.op == "scale":
                kwargs["factor"] = iv.factor
            elif iv.op == "clamp":
                kwargs["min"], kwargs["max"] = iv.min, iv.max
            self._add(iv.op, Ref(ref=read), steps=_STEPS["all"], **kwargs)
            self.ops[iv.op] = self.ops.get(iv.op, 0) + 1

    def _vectors(self, spec: VectorSpec, lookup: VectorLookup) -> dict[int | None, torch.Tensor]:
        if spec.name is None:
            try:
                return {None: decode_vector(spec, self.model.hidden_size)}
            except ValueError as exc:
                raise FieldError("vector", str(exc)) from None
        found = lookup(spec.name)
        if found is None:
            raise FieldError("vector.name", f"no vector named {spec.name!r} for this API key; "
                                            f"upload it with PUT /v1/vectors/{spec.name}")
        return found

    def _capture(self, cap: Capture) -> None:
        if isinstance(cap.positions, list) and cap.steps != "prompt":
            raise ValueError("positions as a list select prompt tokens; use steps='prompt' "
                             "(or positions 'last'/'all' for generated tokens)")
        module, kind = parse_point(cap.point, self.model)
        steps = _STEPS[cap.steps]
        from vinterp_vllm.points import LOGIT_VALUES, resolve_point

        value_kind = resolve_point(self.model.arch, module, kind).value
        if value_kind in LOGIT_VALUES and cap.steps != "generated" and (
                cap.positions != "last"):
            # vLLM computes logits where it samples: at the prompt's last position only
            raise ValueError(f"{cap.point} exists at the prompt's last position only while "
                             "generating (vLLM computes logits where it samples): use "
                             "positions 'last' (or steps 'generated'), capture "
                             "final_norm.output at these positions and apply the LM head, or "
                             "run a trace (POST /v1/traces, remote=True), which computes "
                             "logits at every prompt position")
        read = self._add("read", steps=steps, module=module, kind=kind)
        if kind == "output" and value_kind == "attn":
            # an attention's output is HF's (hidden, weights) tuple: capture the hidden part
            read = self._add("getitem", Ref(ref=read), 0, steps=steps)
        value = read
        full = SliceV(slice=(None, None, None))
        if cap.positions == "last":
            value = self._add("getitem", Ref(ref=read), TupleV(tuple=(full, -1)), steps=steps)
        elif isinstance(cap.positions, list):
            if not cap.positions:
                raise ValueError("positions: give at least one position")
            idx = ListV(list=tuple(cap.positions))
            value = self._add("getitem", Ref(ref=read), TupleV(tuple=(full, idx)), steps=steps)
        save = self._add("save", Ref(ref=value), steps=steps)
        self.captures.append((save, cap, cap.point))
        if value_kind in LOGIT_VALUES:
            self.wide_saves.add(save)

    def _graph(self, data: dict[str, Any], vectors: VectorLookup) -> None:
        if not data.get("invokes"):   # the request's prompt is the one invoke
            data = {**data, "invokes": [{"prompts": [[0]]}]}
        try:
            graph = load(data)
        except GraphError as exc:
            raise FieldError("graph", str(exc)) from None
        graph = resolve_named(graph, vectors)
        if len(graph.invokes) > 1 or any(n.invoke not in (0,) for n in graph.nodes):
            raise FieldError("graph", "a request's graph has one invoke (invoke 0) and runs on "
                                      "this request's prompt; send several invokes to "
                                      "POST /v1/traces")
        self.user_graph = graph

    # ------------------------------------------------------------------ per prompt
    @property
    def n_nodes(self) -> int:
        """Nodes this request runs (for the per-key graph-size limit)."""
        return len(self.nodes) + (len(self.user_graph.nodes) if self.user_graph else 0)

    def check_prompt(self, prompt_len: int, max_tokens: int) -> None:
        """Refuse positions this prompt does not have (they would select nothing, or fail
        inside the engine): a capture's list selects prompt tokens; a steering list may also
        name generated tokens by absolute position, up to ``max_tokens`` past the prompt."""
        n = prompt_len
        for where, positions, generated in self.positions:
            stop = n + max_tokens - 1 if generated else n
            for p in positions:
                if not -n <= p < stop:
                    raise FieldError(where, f"position {p} is outside this request's "
                                            f"{'tokens' if generated else 'prompt'} "
                                            f"(0..{stop - 1}, or -{n}..-1 from the prompt's "
                                            f"end; the prompt has {n} tokens)")

    def graph_for(self, prompt_ids: list[int]) -> Graph:
        """The request's IR graph on these prompt tokens (one invoke, mode ``generate``)."""
        tensors = [encode_tensor(t) for t in self.tensors]
        nodes = [Node(id=n["id"], op=n["op"], args=n["args"], kwargs=n["kwargs"],
                      steps=n["steps"]) for n in self.nodes]
        if self.user_graph is not None:
            nodes += _shifted(self.user_graph, len(nodes), len(tensors))
            tensors += list(self.user_graph.tensors)
        return Graph(mode="generate", invokes=(Invoke(prompts=(tuple(prompt_ids),)),),
                     nodes=tuple(nodes), tensors=tuple(tensors))

    def capture_points(self) -> list[tuple[int, Capture | None, str]]:
        """(save node id, capture spec or ``None`` for a graph's save, label) in order."""
        extra: list[tuple[int, Capture | None, str]] = []
        if self.user_graph is not None:
            base = len(self.nodes)
            extra = [(base + n.id, None, f"graph.node{n.id}")
                     for n in self.user_graph.nodes if n.op == "save"]
        return self.captures + extra

    def graph_save_steps(self, save_id: int) -> Steps:
        """The steps the graph's save ``save_id`` (its id in :meth:`graph_for`) runs at: more
        than one, and its value is a list, one item per step that ran."""
        assert self.user_graph is not None
        own = save_id - len(self.nodes)
        return next(n.steps for n in self.user_graph.nodes if n.id == own)

    def estimate_capture_bytes(self, prompt_len: int, max_tokens: int) -> int:
        """An upper bound of what the shortcut captures hold (float32 rows, hidden-wide or,
        for logits, vocabulary-wide)."""
        total = 0
        for save, cap, _ in self.captures:
            assert cap is not None
            per_step = {"last": 1, "all": None}.get(cap.positions) if isinstance(
                cap.positions, str) else len(cap.positions)
            prompt_rows = prompt_len if per_step is None else per_step
            rows = 0
            if cap.steps in ("prompt", "all"):
                rows += prompt_rows
            if cap.steps in ("generated", "all"):
                rows += max_tokens
            width = self.model.hidden_size
            if save in self.wide_saves:
                width = self.model.vocab_size or width
            total += rows * width * 4
        return total


def resolve_named(graph: Graph, lookup: VectorLookup, field_name: str = "graph") -> Graph:
    """``graph`` with its named tensors (``vinterp.named_vector``) replaced by the caller's
    stored vectors; :class:`FieldError` for unknown names, missing layers or wrong shapes."""
    if not any(isinstance(t, NamedTensor) for t in graph.tensors):
        return graph
    tensors = []
    for i, td in enumerate(graph.tensors):
        if not isinstance(td, NamedTensor):
            tensors.append(td)
            continue
        where = f"{field_name}.tensors[{i}]"
        found = lookup(td.named)
        if found is None:
            raise FieldError(where, f"no vector named {td.named!r} for this API key; upload "
                                    f"it with PUT /v1/vectors/{td.named}")
        vec = found.get(td.layer) if td.layer is not None else None
        if vec is None:
            vec = found.get(None)
        if vec is None:
            which = f"layer {td.layer}" if td.layer is not None else "every layer (give layer=)"
            raise FieldError(where, f"the vector {td.named!r} has no entry for {which}; it "
                                    f"has layers {sorted(k for k in found if k is not None)}")
        if tuple(vec.shape) != tuple(td.shape):
            raise FieldError(where, f"the vector {td.named!r} has shape {list(vec.shape)}; the "
                                    f"graph expects {list(td.shape)}")
        tensors.append(encode_tensor(vec.to(torch_dtype(td.dtype))))
    return graph.model_copy(update={"tensors": tuple(tensors)})


def _shifted(graph: Graph, node_base: int, tensor_base: int) -> list[Node]:
    """``graph``'s nodes renumbered after ``node_base`` nodes and ``tensor_base`` tensors."""
    refs = {n.id: node_base + n.id for n in graph.nodes}
    tens = {k: tensor_base + k for k in range(len(graph.tensors))}
    return [Node.model_validate(node_json(n, id=refs[n.id], refs=refs, tensors=tens))
            for n in graph.nodes]


def _msg(exc: BaseException) -> str:
    return str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)


def npy_bytes(t: torch.Tensor) -> bytes:
    """``t`` as an ``.npy`` file (bfloat16 and float16 widen to float32: numpy's formats)."""
    import io

    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    buf = io.BytesIO()
    np.save(buf, t.detach().cpu().numpy(), allow_pickle=False)
    return buf.getvalue()

"""Proxies: stand-ins for values that exist only once the model runs.

Every operation on a proxy records an allowlisted node in the tracer's graph and returns a new
proxy. After the trace, saved proxies are replaced by their values (see
:mod:`vinterp.tracing.rebind`).

Example::

    with model.trace("The Eiffel Tower is in") as tracer:
        h = model.layers[5].output              # Proxy
        m = h.mean(dim=-1).save()               # Proxy of a 'method mean' node, saved
        model.layers[8].output[:] = 0           # setitem node: zero layer 8's output
    print(m.shape)                              # a real tensor after the block
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch

from vinterp.ir import ops
from vinterp.tracing.errors import TracingError, data_dependent
from vinterp.tracing.shapes import Keys, Rank

if TYPE_CHECKING:
    from vinterp.tracing.tracer import Tracer

_FUNCTION_NAMES: dict[Any, str] = {fn: name for name, fn in ops.TORCH_FUNCTIONS.items()}


class Proxy:
    """A deferred value in a trace: one node of the intervention graph."""

    __slots__ = ("_tracer", "_id", "_value", "_has_value", "__weakref__")

    def __init__(self, tracer: Tracer, node_id: int) -> None:
        object.__setattr__(self, "_tracer", tracer)
        object.__setattr__(self, "_id", node_id)
        object.__setattr__(self, "_value", None)
        object.__setattr__(self, "_has_value", False)

    # ------------------------------------------------------------------ plumbing
    def _add(self, op: str, *args: Any, **kwargs: Any) -> Proxy:
        if self._tracer.finished:
            # a remote session's earlier trace: recorded in the session's open trace
            other = self._tracer.recording_for()
            if other is None:
                raise self._tracer.unavailable(self._id)
            return other.add(op, *args, **kwargs)
        return self._tracer.add(op, *args, **kwargs)

    def __repr__(self) -> str:
        if self._tracer.finished:
            return f"<unsaved vinterp value (node {self._id}); call .save() inside the trace>"
        return f"<vinterp Proxy node {self._id}: {self._tracer.describe(self._id)}>"

    # ------------------------------------------------------------------ graph-level API
    def save(self) -> Proxy:
        """Mark this value to be returned after the block (a snapshot at this point)."""
        if self._tracer.rebound_after_its_loop(self):
            return self._tracer.save_rebound(self)
        proxy = self._add("save", self)
        self._tracer.saved.append(proxy)
        return proxy

    def retain_grad(self) -> Proxy:
        """Keep this value's gradient after ``loss.backward()`` (read it as ``.grad``)."""
        return self._add("retain_grad", self)

    def requires_grad_(self, requires_grad: bool = True) -> Proxy:
        """Track gradients for this value (alias of :meth:`retain_grad` for module values)."""
        return self._add("requires_grad", self)

    def backward(self, **kwargs: Any) -> BackwardBlock:
        """Run backpropagation from this (scalar) value inside the trace.

        All of nnsight's spellings work: ``loss.backward()`` then ``h.grad`` (with
        ``h.retain_grad()``, or saved and read after the block); ``with loss.backward():``
        around the ``.grad`` reads (nnsight 0.5+); and ``h.grad.save()`` written before
        ``loss.backward()`` (nnsight 0.4): each ``.grad`` is read once its backward has run.
        """
        back = self._add("backward", self, **kwargs)
        return BackwardBlock(back)

    @property
    def value(self) -> Any:
        """nnsight 0.4's accessor: after the block, the saved value (the same as the name
        itself, which vinterp already rebinds to the value); inside the block, the proxy."""
        if self._has_value:
            return self._value
        if self._tracer.finished:
            raise self._tracer.unavailable(self._id)
        return self

    # ------------------------------------------------------------------ trace-time shapes
    def _shape(self) -> Any:
        if self._tracer.finished:
            raise self._tracer.unavailable(self._id)
        return self._tracer.known_shape(self._id)

    def size(self, dim: Any = None) -> Any:
        """``x.size()`` / ``x.size(d)``: real ints when the shape is known at trace time."""
        shape = self._shape()
        if isinstance(shape, torch.Size) and (dim is None or isinstance(dim, int)):
            return shape if dim is None else shape[dim]
        return self._add("method", self, *(() if dim is None else (dim,)), name="size")

    def dim(self) -> Any:
        """``x.dim()``: a real int when the shape is known at trace time."""
        shape = self._shape()
        if isinstance(shape, torch.Size):
            return len(shape)
        if isinstance(shape, Rank):
            return shape.dims
        return self._add("method", self, name="dim")

    # ------------------------------------------------------------------ steering shortcuts
    def steer(self, vector: Any, scale: float = 1.0, positions: Any = None) -> Proxy:
        """Add ``scale * vector`` at ``positions`` (absolute, ``"prompt"``, ``"generated"``...)."""
        return self._add("steer", self, vector=vector, scale=scale, positions=positions)

    def scale(self, factor: float, positions: Any = None) -> Proxy:
        """Multiply by ``factor`` at ``positions``."""
        return self._add("scale", self, factor=factor, positions=positions)

    def ablate(self, direction: Any, positions: Any = None) -> Proxy:
        """Project ``direction`` (normalized internally) out at ``positions``."""
        return self._add("ablate", self, direction=direction, positions=positions)

    def replace(self, vector: Any, positions: Any = None) -> Proxy:
        """Set the value to ``vector`` at ``positions``."""
        return self._add("replace", self, vector=vector, positions=positions)

    def clamp(self, *args: Any, **kwargs: Any) -> Proxy:
        """``clamp(direction, min=None, max=None, positions=None)`` clamps the projection onto a
        direction; ``clamp(min, max)`` with numbers is the elementwise ``Tensor.clamp``."""
        first = args[0] if args else kwargs.get("direction")
        is_direction = isinstance(first, (torch.Tensor, list, Proxy)) or "direction" in kwargs
        if isinstance(first, torch.Tensor) and first.dim() == 0:
            is_direction = False
        if not is_direction:
            return self._add("method", self, *args, name="clamp", **kwargs)
        direction = kwargs.pop("direction", None) if "direction" in kwargs else args[0]
        rest = list(args[1:])
        lo = kwargs.pop("min", rest[0] if len(rest) > 0 else None)
        hi = kwargs.pop("max", rest[1] if len(rest) > 1 else None)
        positions = kwargs.pop("positions", rest[2] if len(rest) > 2 else None)
        return self._add("clamp", self, direction=direction, min=lo, max=hi,
                         positions=positions)

    # ------------------------------------------------------------------ tensor API
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if self._tracer.finished:
            raise self._tracer.unavailable(self._id)
        if name in ("keys", "items"):
            keys = self._tracer.known_shape(self._id)
            if isinstance(keys, Keys):   # a mapping's (dict(kwargs), kwargs.items())
                if name == "keys":
                    return lambda: list(keys)
                return lambda: [(k, self[k]) for k in keys]
        if name in ("shape", "ndim"):
            # a real torch.Size when a meta pass of the trace so far can tell (see
            # Tracer.known_shape), so `B, S, _ = x.shape` and `x.view(B, S, H, D)` work
            shape = self._tracer.known_shape(self._id)
            if isinstance(shape, torch.Size):
                return shape if name == "shape" else len(shape)
            if isinstance(shape, Rank):
                # sizes known only when it runs (a later generation step, an edit body):
                # each is a value of the graph, so `B, S, H = x.shape` still unpacks
                return (tuple(self.size(d) for d in range(shape.dims)) if name == "shape"
                        else shape.dims)
        if name == "grad" and self._tracer.backward_blocks:
            # inside `with loss.backward():` the gradient of that backward (nnsight 0.5+)
            return self._add("getattr", self, name=name,
                             backward=self._tracer.backward_blocks[-1])
        if name in ops.ATTRIBUTES:
            return self._add("getattr", self, name=name)
        if name in ops.TENSOR_METHODS:
            def method(*args: Any, **kwargs: Any) -> Proxy:
                return self._add("method", self, *args, name=name, **kwargs)
            return method
        if name in ("item", "tolist") and self._tracer.is_post(self._id):
            # values computed from the generated ids run here after the generation, so a
            # Python number is a value like any other (nnsight: model.samples.item())
            def to_python() -> Proxy:
                return self._add("method", self, name=name)
            return to_python
        if name in ("item", "tolist", "numpy"):
            raise data_dependent(f".{name}()")
        if ops.FIELD_NAME.fullmatch(name):
            # a field of a structured value (``output.pooler_output``, a dataclass's ``.a``):
            # what the value is shows only when the graph runs (ops.read_attribute checks it)
            return self._add("getattr", self, name=name)
        raise _not_available(name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        node = self._tracer.nodes[self._id]
        if node.op == "getattr" and node.kwargs["name"] not in ops.ATTRIBUTES:
            raise _not_available(node.kwargs["name"])   # x.meen(): a method not allowed
        raise TypeError("a vinterp proxy is not callable")

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "grad":
            raise TracingError(
                "replacing a gradient (x.grad = ...) is not supported; read it with "
                "x.grad.save(), or change the loss you call backward() on")
        raise TracingError(f"cannot set attribute {name!r} on a proxy; assign to a module's "
                           ".output/.input or use indexing (x[:] = value)")

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = _FUNCTION_NAMES.get(func)
        proxy = _find_proxy(args, kwargs)
        tracer = proxy._tracer
        if tracer.finished:
            other = tracer.recording_for()   # a remote session's earlier trace
            if other is None:
                raise tracer.unavailable(proxy._id)
            tracer = other
        op = _TENSOR_OPERATORS.get(func)
        if op is not None and not kwargs and len(args) == 2:
            # `v + x` with a tensor on the left: Python asks the tensor first, and torch hands
            # its operator to us; record it as the operator it is
            return tracer.add(op, *args)
        if name is None:
            fname = getattr(func, "__name__", repr(func))
            raise TracingError(
                f"torch function {fname!r} is not in vinterp's allowlist; allowed: "
                f"{sorted(_FUNCTION_NAMES.values())}")
        return tracer.add("call", *args, fn=name, **kwargs)

    def __getitem__(self, key: Any) -> Proxy:
        if type(key) is int and key == 0:
            _warn_if_layer_row(self)
        return self._add("getitem", self, key)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._add("setitem", self, key, value)

    # data-dependent Python: refused with the alternative
    def __bool__(self) -> bool:
        raise data_dependent("bool() / if / while")

    def __len__(self) -> int:
        shape = self._shape()
        if isinstance(shape, Keys):
            return len(shape)
        if isinstance(shape, torch.Size) and len(shape) > 0:
            return int(shape[0])
        if isinstance(shape, int):   # a tuple or list value (e.g. an attention's output)
            return shape
        raise data_dependent("len()")

    def __iter__(self) -> Any:
        # unpacking (`attn_out, weights = model.layers[0].self_attn.output`) and loops over
        # the first dimension work when the length is known at trace time; a mapping's
        # (keyword arguments: `args, kwargs = module.inputs`) iterate over its keys
        shape = self._shape()
        if isinstance(shape, Keys):
            return iter(shape)
        n = len(self)
        return (self[i] for i in range(n))

    def __contains__(self, item: Any) -> bool:
        shape = self._shape()
        if isinstance(shape, Keys):   # `"hidden_states" in kwargs`
            return item in shape
        raise data_dependent("`in`")

    def __index__(self) -> int:
        raise data_dependent("using a proxy as a Python index")

    def __int__(self) -> int:
        raise data_dependent("int()")

    def __float__(self) -> float:
        raise data_dependent("float()")

    def __hash__(self) -> int:
        return id(self)


def _find_proxy(args: Any, kwargs: Any) -> Proxy:
    stack = list(args) + list(kwargs.values())
    while stack:
        a = stack.pop()
        if isinstance(a, Proxy):
            return a
        if isinstance(a, (list, tuple)):
            stack.extend(a)
    raise TracingError("no proxy among the arguments")


class BackwardBlock:
    """What ``loss.backward()`` returns: ignorable as a statement, or nnsight 0.5's
    ``with loss.backward():`` around the ``.grad`` reads. The backward is recorded at the
    call either way; a ``.grad`` read inside the block is that backward's gradient alone
    (another backward before it does not add to it), others wait for the backward they
    belong to (``GraphRunner._link_grads``)."""

    def __init__(self, backward: Proxy) -> None:
        self._backward = backward

    def __enter__(self) -> BackwardBlock:
        self._backward._tracer.backward_blocks.append(self._backward)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._backward._tracer.backward_blocks.remove(self._backward)


#: a tensor's operators (and torch's functions of the same name) as IR binary ops: what torch
#: hands ``__torch_function__`` for ``tensor OP proxy``
_TENSOR_OPERATORS: dict[Any, str] = {}
for _fn, _op in (("add", "add"), ("sub", "sub"), ("mul", "mul"), ("div", "truediv"),
                 ("true_divide", "truediv"), ("matmul", "matmul"), ("pow", "pow"),
                 ("remainder", "mod"), ("floor_divide", "floordiv"), ("eq", "eq"),
                 ("ne", "ne"), ("lt", "lt"), ("le", "le"), ("gt", "gt"), ("ge", "ge")):
    _TENSOR_OPERATORS[getattr(torch.Tensor, _fn)] = _op
    _TENSOR_OPERATORS[getattr(torch._C.TensorBase, _fn)] = _op
    if _fn not in ("matmul",):   # (torch.matmul is an allowlisted call already)
        _TENSOR_OPERATORS[getattr(torch, _fn)] = _op
# what torch hands over for an operator written with a tensor on the left (`v ** x`, `v // x`,
# `mask & (x > 0)`): the tensor's own dunder (a Python wrapper for some, the C method for
# others), not the named function
for _dunder, _op in (("add", "add"), ("sub", "sub"), ("mul", "mul"), ("truediv", "truediv"),
                     ("floordiv", "floordiv"), ("mod", "mod"), ("pow", "pow"),
                     ("matmul", "matmul"), ("and", "and_"), ("or", "or_"), ("xor", "xor")):
    for _cls in (torch.Tensor, torch._C.TensorBase):
        if hasattr(_cls, f"__{_dunder}__"):
            _TENSOR_OPERATORS[getattr(_cls, f"__{_dunder}__")] = _op


def _binary(op: str, reflected: bool = False) -> Any:
    def method(self: Proxy, other: Any) -> Proxy:
        return self._add(op, other, self) if reflected else self._add(op, self, other)
    method.__name__ = f"__{'r' if reflected else ''}{op.rstrip('_')}__"
    return method


def _unary(op: str) -> Any:
    def method(self: Proxy) -> Proxy:
        return self._add(op, self)
    return method


def _warn_if_layer_row(proxy: Proxy) -> None:
    """Warn about ``layer.output[0]`` on a decoder layer: code written for transformers 4
    (the seed's, most nnsight tutorials) means the hidden states there, but transformers 5
    layers return the hidden-states tensor itself, so ``[0]`` is batch row 0, ``[seq,
    hidden]``: the code runs and its shapes and gradients are silently different."""
    tracer = proxy._tracer
    if tracer.finished:
        return
    node = tracer.nodes[proxy._id]
    if node.op != "read" or node.kwargs.get("kind") != "output":
        return
    module = node.kwargs["module"]
    if not tracer.lm._is_layer(module):
        return
    warnings.warn(
        f"{module}.output[0] is batch row 0 (shape [seq, hidden]): in transformers 5 a "
        f"decoder layer returns its hidden states as a tensor, not a tuple. For the hidden "
        f"states (code written for transformers 4, as nnsight's older examples are) write "
        f".output; for row 0 write .output[0, :], which does not warn.", UserWarning,
        stacklevel=3)


def _inplace(op: str) -> Any:
    def method(self: Proxy, other: Any) -> Proxy:
        out = self._add(op, self, other)
        # ``h = x.save(); h += 1``: Python rebinds ``h`` to what this returns, so it must stay
        # saved (in nnsight ``h`` is the tensor itself, edited in place, still saved)
        if self._tracer.nodes[self._id].op == "save" and not self._tracer.finished:
            return out.save()
        return out
    return method


for _op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul",
            "and_", "or_", "xor"):
    _dunder = _op.rstrip("_")
    setattr(Proxy, f"__{_dunder}__", _binary(_op))
    setattr(Proxy, f"__r{_dunder}__", _binary(_op, reflected=True))
for _op in ("lt", "le", "gt", "ge", "eq", "ne"):
    setattr(Proxy, f"__{_op}__", _binary(_op))
for _op in ops.UNARY_OPS:
    setattr(Proxy, f"__{_op}__", _unary(_op))
for _op in ops.INPLACE_OPS:
    setattr(Proxy, f"__{_op}__", _inplace(_op))


def apply(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """nnsight's ``apply(fn, *args)``, limited to what a graph may run: ``fn`` must be an
    allowlisted torch function (``torch.softmax``, ``torch.nn.functional.gelu``, ...) or
    tensor method (``torch.Tensor.mean``). With no proxy among the arguments it just calls
    ``fn``. Other callables are refused: a graph carries no code.

    Example::

        with model.trace("Hi"):
            p = vinterp.apply(torch.softmax, model.logits, dim=-1).save()
    """
    try:
        proxy = _find_proxy(args, kwargs)
    except TracingError:
        return fn(*args, **kwargs)
    name = _FUNCTION_NAMES.get(fn)
    if name is not None:
        return proxy._tracer.add("call", *args, fn=name, **kwargs)
    method = getattr(fn, "__name__", None)
    if getattr(fn, "__objclass__", None) is torch._C.TensorBase and method in \
            ops.TENSOR_METHODS and args and isinstance(args[0], Proxy):
        return args[0]._add("method", *args, name=method, **kwargs)
    raise TracingError(
        f"vinterp.apply({getattr(fn, '__qualname__', fn)!r}, ...): a trace runs only "
        "allowlisted functions (its graph carries no code). Use one of "
        f"{sorted(_FUNCTION_NAMES.values())} or an allowlisted tensor method, or save the "
        "values and call your function after the block")


class StepValue(Proxy):
    """``model.logits`` / ``model.samples``: a step's value that is also its own ``.output``.

    nnsight's vLLM docs wrote ``model.logits.output`` and ``model.samples.output`` (wrapper
    modules, nnsight <= 0.7); nnsight 0.8 reads ``model.logits`` / ``model.samples`` directly.
    Both spellings give the same value.

    Example::

        >>> with model.generate("Hi", max_new_tokens=3) as tracer:    # doctest: +SKIP
        ...     ids = list().save()
        ...     for step in tracer.iter[:]:
        ...         ids.append(model.samples.output.item())
    """

    __slots__ = ()

    @property
    def output(self) -> Proxy:
        """The same value (nnsight's ``model.logits.output`` spelling)."""
        return Proxy(self._tracer, self._id)


def _not_available(name: str) -> AttributeError:
    return AttributeError(
        f"{name!r} is not available on a vinterp proxy: allowed tensor methods are "
        f"{sorted(ops.TENSOR_METHODS)} and attributes {sorted(ops.ATTRIBUTES)} (and the "
        "fields of structured outputs, such as output.pooler_output)")

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

from typing import TYPE_CHECKING, Any

import torch

from vinterp.ir import ops
from vinterp.tracing.errors import TracingError, data_dependent

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
            raise self._tracer.unavailable(self._id)
        return self._tracer.add(op, *args, **kwargs)

    def __repr__(self) -> str:
        if self._tracer.finished:
            return f"<unsaved vinterp value (node {self._id}); call .save() inside the trace>"
        return f"<vinterp Proxy node {self._id}: {self._tracer.describe(self._id)}>"

    # ------------------------------------------------------------------ graph-level API
    def save(self) -> Proxy:
        """Mark this value to be returned after the block (a snapshot at this point)."""
        proxy = self._add("save", self)
        self._tracer.saved.append(proxy)
        return proxy

    def retain_grad(self) -> Proxy:
        """Keep this value's gradient after ``loss.backward()`` (read it as ``.grad``)."""
        return self._add("retain_grad", self)

    def requires_grad_(self, requires_grad: bool = True) -> Proxy:
        """Track gradients for this value (alias of :meth:`retain_grad` for module values)."""
        return self._add("requires_grad", self)

    def backward(self, **kwargs: Any) -> None:
        """Run backpropagation from this (scalar) value inside the trace."""
        self._add("backward", self, **kwargs)

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
        if name in ops.ATTRIBUTES:
            return self._add("getattr", self, name=name)
        if name in ops.TENSOR_METHODS:
            def method(*args: Any, **kwargs: Any) -> Proxy:
                return self._add("method", self, *args, name=name, **kwargs)
            return method
        if name in ("item", "tolist", "numpy"):
            raise data_dependent(f".{name}()")
        raise AttributeError(
            f"{name!r} is not available on a vinterp proxy: allowed tensor methods are "
            f"{sorted(ops.TENSOR_METHODS)} and attributes {sorted(ops.ATTRIBUTES)}"
        )

    def __setattr__(self, name: str, value: Any) -> None:
        raise TracingError(f"cannot set attribute {name!r} on a proxy; assign to a module's "
                           ".output/.input or use indexing (x[:] = value)")

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = _FUNCTION_NAMES.get(func)
        tracer = _find_tracer(args, kwargs)
        if name is None:
            fname = getattr(func, "__name__", repr(func))
            raise TracingError(
                f"torch function {fname!r} is not in vinterp's allowlist; allowed: "
                f"{sorted(_FUNCTION_NAMES.values())}")
        return tracer.add("call", *args, fn=name, **kwargs)

    def __getitem__(self, key: Any) -> Proxy:
        return self._add("getitem", self, key)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._add("setitem", self, key, value)

    # data-dependent Python: refused with the alternative
    def __bool__(self) -> bool:
        raise data_dependent("bool() / if / while")

    def __len__(self) -> int:
        raise data_dependent("len()")

    def __iter__(self) -> Any:
        raise data_dependent("iteration")

    def __index__(self) -> int:
        raise data_dependent("using a proxy as a Python index")

    def __int__(self) -> int:
        raise data_dependent("int()")

    def __float__(self) -> float:
        raise data_dependent("float()")

    def __hash__(self) -> int:
        return id(self)


def _find_tracer(args: Any, kwargs: Any) -> Tracer:
    stack = list(args) + list(kwargs.values())
    while stack:
        a = stack.pop()
        if isinstance(a, Proxy):
            return a._tracer
        if isinstance(a, (list, tuple)):
            stack.extend(a)
    raise TracingError("no proxy among the arguments")


def _binary(op: str, reflected: bool = False) -> Any:
    def method(self: Proxy, other: Any) -> Proxy:
        return self._add(op, other, self) if reflected else self._add(op, self, other)
    method.__name__ = f"__{'r' if reflected else ''}{op.rstrip('_')}__"
    return method


def _unary(op: str) -> Any:
    def method(self: Proxy) -> Proxy:
        return self._add(op, self)
    return method


def _inplace(op: str) -> Any:
    def method(self: Proxy, other: Any) -> Proxy:
        return self._add(op, self, other)
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

"""How much memory one graph operation may allocate: the guard the interpreter runs before
ops that can make a tensor larger than any of their arguments.

A graph comes from an untrusted user and runs inside the serving process (the vLLM worker),
where one out-of-memory error takes the engine down for every user. Constructors
(``torch.zeros`` & co.) were bounded by the sizes they are given; these ops allocate from
their arguments' shapes instead: ``x.repeat(1, 1, 20000)``, ``v.expand(n, d).contiguous()``,
``torch.outer(a, b)``, ``F.pad``, ``F.one_hot``, a broadcast ``a[:, None] * b``, ``h[idx]``
with a long index, a matmul of broadcast views.

The rule: an op may make a tensor of up to :data:`MAX_NUMEL` elements, or as many as its
largest argument's storage holds (what the model itself computed, such as the logits, may be
larger, and the same-size results of ops on it are allowed). The result's size is computed
before the op runs (shape arithmetic, or the op on meta tensors), so nothing is allocated.

Example::

    >>> check_result_size("method repeat", lambda t, *s: t.repeat(*s),  # doctest: +ELLIPSIS
    ...                   [torch.zeros(1, 7, 576), 1, 1, 20000], {})
    Traceback (most recent call last):
    ...
    ValueError: method repeat would make a tensor of 80640000 elements; the limit is 67108864 ...
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch

#: elements any one op may allocate (beyond the size of its largest argument)
MAX_NUMEL = 64 * 2**20

#: ops whose result has the broadcast shape of their tensor arguments (methods, functions)
_BROADCAST = frozenset({
    "method add", "method sub", "method mul", "method div", "method pow", "method eq",
    "method ne", "method lt", "method le", "method gt", "method ge", "method where",
    "method masked_fill", "torch.where", "torch.masked_fill", "torch.cosine_similarity",
    "torch.nn.functional.cosine_similarity", "torch.nn.functional.mse_loss",
    "torch.nn.functional.kl_div",
})
#: the IR's binary operators other than matmul (``a[:, None] * b`` broadcasts)
_OPERATORS = frozenset({
    "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and_", "or_", "xor", "lt",
    "le", "gt", "ge", "eq", "ne",
})
_MATMUL = frozenset({"matmul", "method matmul", "torch.matmul", "torch.mm", "torch.bmm"})
#: tensor methods whose result may hold more elements than their arguments
GROWING_METHODS = frozenset({"repeat", "matmul", "index_select"} | {
    w.split()[1] for w in _BROADCAST if w.startswith("method ")})
#: torch functions whose result may hold more elements than their arguments
GROWING_FUNCTIONS = frozenset({
    "torch.cat", "torch.stack", "torch.einsum", "torch.matmul", "torch.bmm", "torch.mm",
    "torch.outer", "torch.tensordot", "torch.index_select", "torch.nn.functional.linear",
    "torch.nn.functional.pad", "torch.nn.functional.one_hot",
} | {w for w in _BROADCAST if w.startswith("torch.")})
#: methods that return a view and never allocate, whatever the view's size
PURE_VIEWS = frozenset({
    "view", "view_as", "expand", "expand_as", "transpose", "permute", "squeeze", "unsqueeze",
    "narrow", "select", "t", "detach", "size", "dim", "numel",
})


def _tensors(values: Any) -> Iterator[torch.Tensor]:
    stack = [values]
    while stack:
        v = stack.pop()
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v.values())


def _held(t: torch.Tensor) -> int:
    """Elements ``t``'s storage holds (fewer than ``t.numel()`` for an expanded view)."""
    try:
        return t.untyped_storage().nbytes() // max(1, t.element_size())
    except (RuntimeError, NotImplementedError):
        return t.numel()


def _meta(value: Any) -> Any:
    """``value`` with each tensor replaced by an empty one of its shape on the meta device."""
    if isinstance(value, torch.Tensor):
        return torch.empty(value.shape, dtype=value.dtype, device="meta")
    if isinstance(value, list):
        return [_meta(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_meta(v) for v in value)
    if isinstance(value, dict):
        return {k: _meta(v) for k, v in value.items()}
    return value


def _result_shapes(fn: Callable[..., Any], args: list[Any], kwargs: dict[str, Any]
                   ) -> list[torch.Size] | None:
    """The shapes of ``fn(*args, **kwargs)``'s tensors, from a run on meta tensors; ``None``
    where that cannot tell (a size that depends on the values, such as a boolean mask's)."""
    try:
        out = fn(*_meta(args), **_meta(kwargs))
    except Exception:
        return None
    return [t.shape for t in _tensors(out)]


def _broadcast_numel(shapes: list[torch.Size]) -> int:
    """Elements of the broadcast of ``shapes`` (its shape's product; shapes that do not
    broadcast fail in the op itself)."""
    n = max(len(sh) for sh in shapes)
    numel = 1
    for i in range(1, n + 1):
        dims = [sh[-i] for sh in shapes if len(sh) >= i]
        numel *= 0 if 0 in dims else max(dims)
    return numel


def _matmul_numel(a: torch.Tensor, b: torch.Tensor) -> int:
    """Elements of ``a @ b`` (torch.matmul's rules: 1-D operands, broadcast batch dims)."""
    if a.dim() == 0 or b.dim() == 0:
        return max(a.numel(), b.numel())
    rows = a.shape[-2] if a.dim() > 1 else 1
    cols = b.shape[-1] if b.dim() > 1 else 1
    batch = [sh for sh in (a.shape[:-2], b.shape[:-2]) if len(sh)]
    return (_broadcast_numel(batch) if batch else 1) * rows * cols


def _repeat_numel(t: torch.Tensor, args: list[Any], kwargs: dict[str, Any]) -> int:
    """Elements of ``t.repeat(*args)`` (or ``t.repeat(sizes)``)."""
    reps = kwargs.get("repeats", args[0] if len(args) == 1 and not isinstance(args[0], int)
                      else args)
    reps = [int(r) for r in reps]
    shape = [1] * (len(reps) - t.dim()) + list(t.shape)
    return math.prod(d * r for d, r in zip(shape, reps, strict=False))


def _pad_numel(t: torch.Tensor, pad: Any) -> int:
    shape = list(t.shape)
    for i in range(len(pad) // 2):
        shape[-1 - i] += int(pad[2 * i]) + int(pad[2 * i + 1])
    return math.prod(max(0, d) for d in shape)


def _one_hot_numel(t: torch.Tensor, n: Any) -> int:
    if n is None or int(n) < 0:   # as many classes as the largest value + 1
        n = int(t.max()) + 1 if t.numel() else 0
    return t.numel() * int(n)


def _result_numel(what: str, fn: Callable[..., Any], args: list[Any],
                  kwargs: dict[str, Any]) -> int | None:
    """Elements the op's result will have, computed from its arguments' shapes (or, for
    the rare ops with no rule here, by running it on meta tensors); ``None``: unknown until
    it runs (a size that depends on the values, such as a boolean mask's)."""
    tensors = list(_tensors((args, kwargs)))
    first = args[0] if args else None
    if what in _BROADCAST or what in _OPERATORS:
        return _broadcast_numel([t.shape for t in tensors])
    if what in _MATMUL:
        return _matmul_numel(args[0], args[1])
    if what == "torch.outer":
        return args[0].numel() * args[1].numel()
    if what in ("torch.cat", "torch.stack"):
        return sum(t.numel() for t in _tensors(first))
    if what == "method repeat":
        return _repeat_numel(first, args[1:], kwargs)
    if what == "torch.nn.functional.pad":
        return _pad_numel(first, kwargs.get("pad", args[1] if len(args) > 1 else ()))
    if what == "torch.nn.functional.one_hot":
        return _one_hot_numel(first, kwargs.get("num_classes",
                                                args[1] if len(args) > 1 else -1))
    if what == "torch.nn.functional.linear":
        weight = kwargs.get("weight", args[1] if len(args) > 1 else None)
        if isinstance(weight, torch.Tensor) and first.dim() > 0:
            out = weight.shape[0] if weight.dim() > 1 else 1
            return first.numel() // max(1, first.shape[-1]) * out
    if what in ("method index_select", "torch.index_select"):
        index = args[-1] if len(args) >= 3 else kwargs.get("index")
        dim = args[-2] if len(args) >= 3 else kwargs.get("dim")
        if isinstance(index, torch.Tensor) and isinstance(dim, int) and first.dim() > 0:
            return first.numel() // max(1, first.shape[dim]) * index.numel()
    if what == "indexing":
        # a cheap bound first: at most the indexed value's size times each index tensor's
        key = args[1]
        if not any(isinstance(k, list) for k in (key if isinstance(key, tuple) else (key,))):
            bound = first.numel() * math.prod(t.numel() for t in _tensors(key))
            if bound <= MAX_NUMEL:
                return bound
    shapes = _result_shapes(fn, args, kwargs)
    return None if shapes is None else sum(math.prod(sh) for sh in shapes)


def check_result_size(what: str, fn: Callable[..., Any], args: list[Any],
                      kwargs: dict[str, Any], *, growing: bool = True) -> bool:
    """Refuse ``fn(*args, **kwargs)`` (named ``what`` in the message) if it would allocate a
    tensor of more than ``max(MAX_NUMEL, largest argument's storage)`` elements.

    ``growing``: whether the op may make more elements than its arguments have (computed
    from their shapes); otherwise only an expanded view among the arguments can make it
    allocate more than it holds (``v.expand(n, d).contiguous()``).

    Returns whether the size was known before the op runs; if not, call
    :func:`check_result` on what it made.
    """
    tensors = list(_tensors((args, kwargs)))
    if not tensors:
        return True
    if growing:
        numel = _result_numel(what, fn, args, kwargs)
        if numel is None:
            return False
    else:
        numel = max(t.numel() for t in tensors)
    if numel > MAX_NUMEL:   # (most ops stop here: storage sizes are asked only past it)
        limit = max(MAX_NUMEL, max(_held(t) for t in tensors))
        if numel > limit:
            _refuse(what, numel, None, limit)
    return True


def check_result(what: str, result: Any, args: list[Any], kwargs: dict[str, Any]) -> None:
    """After an op whose size could not be computed before it ran: the same limit on what it
    made (so no value that large is kept, and the request fails with a clear message)."""
    made = [t for t in _tensors(result) if not any(t is a for a in _tensors((args, kwargs)))]
    if not made:
        return
    inputs = list(_tensors((args, kwargs)))
    limit = max([MAX_NUMEL] + [_held(t) for t in inputs])
    for t in made:
        if _held(t) > limit and t.numel() > limit:
            _refuse(what, t.numel(), t.shape, limit)


def _refuse(what: str, numel: int, shape: torch.Size | None, limit: int) -> None:
    dims = f" ({list(shape)})" if shape is not None else ""
    raise ValueError(
        f"{what} would make a tensor of {numel} elements{dims}; the limit is {limit} "
        f"elements ({MAX_NUMEL} or, if larger, the size of its largest argument). Make the "
        "value smaller (fewer repeats, a slice of the positions), or compute it after the "
        "trace")

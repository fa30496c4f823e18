"""The allowlist of operations an intervention graph may contain, and how each one runs.

Everything a graph can do is named here. Anything else is rejected by :func:`vinterp.ir.load`
before it runs, which is what makes it safe to execute graphs sent by untrusted users.

Op families (``Node.op``):

* ``read`` / ``write`` — a module's value at a point (``kwargs: module, kind``); run by backends.
* ``save`` — snapshot a value to return to the caller.
* operators (``add``, ``getitem``, ``setitem``, ``iadd``, ``lt`` ...), allowlisted tensor
  methods (``method`` with ``kwargs.name``), torch functions (``call`` with ``kwargs.fn``),
  attributes (``getattr`` with ``kwargs.name``).
* steering ops (``steer``, ``scale``, ``ablate``, ``clamp``, ``replace``): IR nodes of their own
  so the vLLM plugin can vectorize them across requests.
* ``backward``, ``retain_grad``, ``requires_grad``, ``stop``.
* ``call_module`` — call one of the model's own modules on values (``kwargs: module`` = its
  HF path, ``kwargs`` = keyword arguments), e.g. the logit lens
  ``model.lm_head(model.model.norm(h))``. Data, not code: the path names a module the model
  already has, and the backend checks it exists.
"""

from __future__ import annotations

import dataclasses
import operator
import re
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F

from vinterp.ir.schema import DictV, Node, Ref

POINT_OPS = frozenset({"read", "write"})
POINT_KINDS = frozenset({"output", "input", "inputs"})
STEERING_OPS = frozenset({"steer", "scale", "ablate", "clamp", "replace"})
CONTROL_OPS = frozenset({"save", "backward", "retain_grad", "requires_grad", "stop"})
#: calls of the model's own modules on values (see ``check_call``)
MODULE_OPS = frozenset({"call_module"})
#: what a module path may look like: dotted identifiers and indices (``model.layers.3.mlp``)
MODULE_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")

BINARY_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "add": operator.add, "sub": operator.sub, "mul": operator.mul,
    "truediv": operator.truediv, "floordiv": operator.floordiv, "mod": operator.mod,
    "pow": operator.pow, "matmul": operator.matmul,
    "and_": operator.and_, "or_": operator.or_, "xor": operator.xor,
    "lt": operator.lt, "le": operator.le, "gt": operator.gt, "ge": operator.ge,
    "eq": operator.eq, "ne": operator.ne,
}
UNARY_OPS: dict[str, Callable[[Any], Any]] = {
    "neg": operator.neg, "pos": operator.pos, "abs": operator.abs, "invert": operator.invert,
}
#: in-place operators: they mutate their first argument (a module's tensor writes through).
INPLACE_OPS: dict[str, str] = {
    "iadd": "add_", "isub": "sub_", "imul": "mul_", "itruediv": "div_",
    "ipow": "pow_", "iand": "bitwise_and_", "ior": "bitwise_or_",
}
ITEM_OPS = frozenset({"getitem", "setitem"})

#: tensor methods a graph may call (``x.mean(dim=-1)`` → ``method`` node, ``name="mean"``).
TENSOR_METHODS = frozenset({
    "abs", "add", "add_", "all", "amax", "amin", "any", "argmax", "argmin", "argsort",
    "bfloat16", "ceil", "chunk", "clamp", "clamp_", "clip", "clone", "contiguous", "copy_",
    "cos", "cpu", "cumsum", "detach", "diff", "dim", "div", "div_", "dot", "double", "eq",
    "exp", "expand", "expand_as", "fill_", "flatten", "flip", "float", "floor", "gather", "ge",
    "gt", "half", "index_select", "le", "log", "log_softmax", "logsumexp", "lt", "masked_fill",
    "masked_fill_", "matmul", "max", "mean", "min", "mul", "mul_", "narrow", "ne", "neg",
    "norm", "numel", "permute", "pow", "prod", "reciprocal", "relu", "repeat", "reshape",
    "roll", "round", "rsqrt", "select", "sigmoid", "sign", "sin", "size", "softmax", "sort",
    "split", "sqrt", "square", "squeeze", "std", "sub", "sub_", "sum", "t", "tanh", "to",
    "topk", "transpose", "type_as", "unsqueeze", "var", "view", "view_as", "where", "zero_",
    "unbind",
})

#: attributes a graph may read: tensor metadata, HF output fields, named-tuple fields.
ATTRIBUTES = frozenset({
    "shape", "dtype", "ndim", "T", "mT", "grad", "device", "real", "imag",
    "logits", "last_hidden_state", "hidden_states", "attentions", "past_key_values",
    "values", "indices", "loss",
})

#: any other attribute a graph reads must be a field of a structured value (an HF
#: ``ModelOutput`` such as ``.pooler_output``, a dataclass, a named tuple), checked when it
#: runs (:func:`read_attribute`): a plain name, never a private or dunder one
FIELD_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def read_attribute(value: Any, name: str) -> Any:
    """``value.name`` for a ``getattr`` node: an allowlisted attribute, or a field of a
    structured value; anything else is refused, naming what the value offers.

    Example::

        >>> read_attribute(torch.zeros(2, 3), "shape")
        torch.Size([2, 3])
    """
    if name in ATTRIBUTES:
        return getattr(value, name)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        names = [f.name for f in dataclasses.fields(value)]
    else:
        names = list(getattr(value, "_fields", ())) if isinstance(value, tuple) else []
    if name in names:
        return getattr(value, name)
    if isinstance(value, torch.Tensor):
        raise AttributeError(f"{name!r} is not available on a tensor: allowed tensor methods "
                             f"are {sorted(TENSOR_METHODS)} and attributes {sorted(ATTRIBUTES)}")
    hint = f"; its fields are {names}" if names else ""
    if isinstance(value, dict):
        hint = f"; read its entries as value[key] (keys: {list(value)})"
    raise AttributeError(f"a {type(value).__name__} has no field {name!r}{hint}")


#: torch functions a graph may call, by the dotted name users write.
TORCH_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "torch.softmax": torch.softmax, "torch.log_softmax": torch.log_softmax,
    "torch.cat": torch.cat, "torch.stack": torch.stack, "torch.where": torch.where,
    "torch.einsum": torch.einsum, "torch.matmul": torch.matmul, "torch.bmm": torch.bmm,
    "torch.mm": torch.mm, "torch.outer": torch.outer, "torch.dot": torch.dot,
    "torch.norm": torch.norm, "torch.linalg.norm": torch.linalg.norm,
    "torch.linalg.vector_norm": torch.linalg.vector_norm,
    "torch.abs": torch.abs, "torch.exp": torch.exp, "torch.log": torch.log,
    "torch.sqrt": torch.sqrt, "torch.tanh": torch.tanh, "torch.sigmoid": torch.sigmoid,
    "torch.relu": torch.relu, "torch.clamp": torch.clamp, "torch.sum": torch.sum,
    "torch.mean": torch.mean, "torch.max": torch.max, "torch.min": torch.min,
    "torch.argmax": torch.argmax, "torch.argmin": torch.argmin, "torch.topk": torch.topk,
    "torch.sort": torch.sort, "torch.cumsum": torch.cumsum, "torch.diff": torch.diff,
    "torch.zeros_like": torch.zeros_like, "torch.ones_like": torch.ones_like,
    "torch.full_like": torch.full_like, "torch.randn_like": torch.randn_like,
    "torch.rand_like": torch.rand_like, "torch.cosine_similarity": torch.cosine_similarity,
    "torch.flip": torch.flip, "torch.roll": torch.roll, "torch.logsumexp": torch.logsumexp,
    "torch.gather": torch.gather, "torch.index_select": torch.index_select,
    "torch.masked_fill": torch.masked_fill, "torch.square": torch.square,
    "torch.transpose": torch.transpose, "torch.permute": torch.permute,
    "torch.reshape": torch.reshape, "torch.flatten": torch.flatten,
    "torch.squeeze": torch.squeeze, "torch.unsqueeze": torch.unsqueeze,
    "torch.chunk": torch.chunk, "torch.split": torch.split, "torch.tensordot": torch.tensordot,
    "torch.isfinite": torch.isfinite, "torch.isnan": torch.isnan,
    "torch.zeros": torch.zeros, "torch.ones": torch.ones, "torch.full": torch.full,
    "torch.arange": torch.arange, "torch.eye": torch.eye, "torch.randn": torch.randn,
    "torch.rand": torch.rand,
    "torch.nn.functional.softmax": F.softmax, "torch.nn.functional.log_softmax": F.log_softmax,
    "torch.nn.functional.gelu": F.gelu, "torch.nn.functional.relu": F.relu,
    "torch.nn.functional.silu": F.silu, "torch.nn.functional.sigmoid": F.sigmoid,
    "torch.nn.functional.tanh": F.tanh, "torch.nn.functional.layer_norm": F.layer_norm,
    "torch.nn.functional.rms_norm": F.rms_norm, "torch.nn.functional.normalize": F.normalize,
    "torch.nn.functional.cosine_similarity": F.cosine_similarity,
    "torch.nn.functional.cross_entropy": F.cross_entropy,
    "torch.nn.functional.nll_loss": F.nll_loss,
    "torch.nn.functional.kl_div": F.kl_div, "torch.nn.functional.mse_loss": F.mse_loss,
    "torch.nn.functional.one_hot": F.one_hot, "torch.nn.functional.linear": F.linear,
    "torch.nn.functional.pad": F.pad,
}
#: functions that allocate from sizes given in the graph: their results are size-checked.
CONSTRUCTORS = frozenset({
    "torch.zeros", "torch.ones", "torch.full", "torch.arange", "torch.eye", "torch.randn",
    "torch.rand",
})


#: ops whose result may be a view of their first argument (edits through them reach it).
VIEW_METHODS = frozenset({
    "view", "view_as", "reshape", "transpose", "permute", "squeeze", "unsqueeze", "narrow",
    "select", "expand", "expand_as", "t", "flatten", "contiguous", "detach",
})


def is_view(op: str, method_name: Any = None) -> bool:
    """Whether a node's result may share storage with its first argument."""
    return op in ("getitem", "save") or (op == "method" and method_name in VIEW_METHODS)


#: allowlisted functions with an ``inplace`` parameter, and its position
INPLACE_PARAM: dict[str, int] = {
    "torch.nn.functional.relu": 1, "torch.nn.functional.silu": 1,
}


def is_edit(node: Node) -> bool:
    """Whether ``node`` changes its first argument in place: assignment, in-place operators
    and methods (``x += v``, ``x.mul_(2)``), steering ops, and allowlisted functions called
    with ``inplace=True`` (``F.relu(x, inplace=True)``, or ``F.relu(x, True)``).

    The one rule for what counts as an edit: the tracer, the interpreter and the prefix
    cache's isolation of writers (``backends/vllm/requests.py``) all ask it.

    >>> from vinterp.ir.schema import Node, Ref
    >>> is_edit(Node(id=1, op="call", args=(Ref(ref=0),),
    ...              kwargs={"fn": "torch.nn.functional.relu", "inplace": True}))
    True
    """
    op = node.op
    if op in ("setitem", "write") or op in INPLACE_OPS or op in STEERING_OPS:
        return True
    if op == "method":
        name = node.kwargs.get("name")
        return isinstance(name, str) and name.endswith("_")
    if op == "call":
        pos = INPLACE_PARAM.get(node.kwargs.get("fn"))  # type: ignore[arg-type]
        return pos is not None and (node.kwargs.get("inplace") is True
                                    or len(node.args) > pos and node.args[pos] is True)
    return False


def writes(nodes: Iterable[Node]) -> bool:
    """True if any of ``nodes`` may change activations (:func:`is_edit`): the prefix cache
    keeps such a request's KV to itself, and the vLLM plugin watches its output."""
    return any(is_edit(n) for n in nodes)


def acts_on_prompt(nodes: Iterable[Node]) -> bool:
    """True if any of ``nodes`` reads or edits a value in the prompt's forward (step 0): the
    request needs every prompt position run by itself (not served from vLLM's prefix cache).
    """
    return any(n.steps.start == 0 and (n.op == "read" or is_edit(n)) for n in nodes)


def known_op(op: str) -> bool:
    """True if ``op`` is a node op the IR allows."""
    return (
        op in POINT_OPS or op in STEERING_OPS or op in CONTROL_OPS or op in BINARY_OPS
        or op in UNARY_OPS or op in INPLACE_OPS or op in ITEM_OPS
        or op in MODULE_OPS or op in {"method", "call", "getattr"}
    )


def check_call(node_op: str, kwargs: dict[str, Any]) -> str | None:
    """Return an error message if a ``method``/``call``/``getattr``/point node is not allowed."""
    if node_op in ("method", "call") and "out" in kwargs:
        return ("'out=' is not supported in graphs (a graph's writes must name what they "
                "change): assign the result instead, e.g. y[:] = torch.f(x)")
    if node_op == "method":
        name = kwargs.get("name")
        if name not in TENSOR_METHODS:
            return f"tensor method {name!r} is not in the allowlist"
    elif node_op == "call":
        fn = kwargs.get("fn")
        if fn not in TORCH_FUNCTIONS:
            return f"function {fn!r} is not in the allowlist"
    elif node_op == "getattr":
        name = kwargs.get("name")
        if name not in ATTRIBUTES and not (isinstance(name, str) and FIELD_NAME.fullmatch(name)):
            return (f"attribute {name!r} is neither in the allowlist nor a field name (letters, "
                    "digits and '_', not starting with '_')")
        if set(kwargs) - {"name", "backward"}:
            return f"getattr takes only 'name' (and 'backward' for grad), got {sorted(kwargs)}"
        if "backward" in kwargs and (name != "grad" or not isinstance(kwargs["backward"], Ref)):
            return "getattr's 'backward' (the backward a .grad belongs to) must be a reference " \
                   "to a backward node, on name 'grad'"
    elif node_op in MODULE_OPS:
        path = kwargs.get("module")
        if not isinstance(path, str) or not MODULE_PATH.fullmatch(path):
            return (f"call_module needs 'module': a dotted HF module path such as "
                    f"'model.norm' (not the whole model), got {path!r}")
        if set(kwargs) - {"module", "kwargs"}:
            return f"call_module takes only 'module' and 'kwargs', got {sorted(kwargs)}"
        if kwargs.get("kwargs") is not None and not isinstance(kwargs["kwargs"], DictV):
            return "call_module's 'kwargs' must be a mapping ({\"mapping\": {...}})"
    elif node_op in POINT_OPS:
        if not isinstance(kwargs.get("module"), str):
            return "point op needs a string 'module' (an HF module path, '' for the model)"
        if kwargs.get("kind") not in POINT_KINDS:
            return f"point kind must be one of {sorted(POINT_KINDS)}, got {kwargs.get('kind')!r}"
    return None

"""``with tracer.all():`` / ``with tracer.iter[a:b]:`` run their body once per generation step.

nnsight 0.8 runs the body of these (deprecated) ``with`` forms once per step, exactly like
``for step in tracer.iter[...]:`` (its ``Iterations.execute`` re-executes the block's code
with the step pinned): ``hs.append(x)`` inside gives one item per step, and ``x = ....save()``
leaves ``x`` holding the last step's value. We do the same: the body runs natively for the
first step, then :func:`rerun` executes the block's own source (found from the caller's frame
with :mod:`ast`, compiled with its file name and line numbers) for every further step, in a
namespace holding the frame's names, and writes the names it assigns back into the frame.

A body that only edits the model (``m.layers[L].output.steer(v)``, ``x[:] += v`` on a module
value, ``for`` / ``if`` around such writes, no names bound, nothing saved or appended: see
:func:`_pure`) gives the same result run once or N times, so it is recorded once for all
steps: one graph node per edit, not one per edit and step, which keeps the graph small and
the vLLM fast path's vectorized steering.
"""

from __future__ import annotations

import ast
import ctypes
import linecache
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import CodeType, FrameType
from typing import Any

from vinterp.tracing.errors import TracingError

_CO_OPTIMIZED = 0x0001

#: methods that only record (vinterp's steering shortcuts, tensor ops on proxies)
_PURE_METHODS = frozenset({
    "steer", "scale", "ablate", "clamp", "replace",
    "abs", "add", "clone", "contiguous", "detach", "div", "exp", "expand", "expand_as",
    "flatten", "float", "half", "bfloat16", "matmul", "mean", "mul", "neg", "norm",
    "permute", "pow", "relu", "repeat", "reshape", "sigmoid", "softmax", "log_softmax",
    "sqrt", "squeeze", "sub", "sum", "tanh", "to", "transpose", "type_as", "unsqueeze",
    "view", "zeros_like", "ones_like", "apply",
})
_PURE_FUNCTIONS = frozenset({"float", "int", "bool", "abs", "min", "max", "round", "range",
                             "len", "slice", "tuple", "enumerate", "zip", "reversed"})
_PURE_MODULES = frozenset({"torch", "F", "math"})
#: functions of those modules that draw random numbers: a different value at every call, so a
#: body calling them must run once per step (fresh noise each step, as in nnsight)
_RANDOM = frozenset({
    "rand", "rand_like", "randn", "randn_like", "randint", "randint_like", "randperm",
    "normal", "bernoulli", "multinomial", "poisson", "binomial", "dropout", "dropout1d",
    "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout", "rrelu",
    "gumbel_softmax", "random",
})
#: the attributes of a module envoy that name one of its values (a write target)
_POINTS = frozenset({"output", "input", "inputs"})


@dataclass(frozen=True)
class Body:
    """The block of a ``with`` step scope: its compiled code and whether it is pure."""

    code: CodeType
    pure: bool
    line: int


_trees: dict[tuple[str, int], dict[int, ast.With]] = {}
_bodies: dict[tuple[str, int, int], Body] = {}


def find(frame: FrameType) -> Body | None:
    """The body of the ``with`` statement being entered in ``frame``; ``None`` when its source
    cannot be read (code run from a string, a frozen module)."""
    filename = frame.f_code.co_filename
    lines = linecache.getlines(filename, frame.f_globals)
    if not lines:
        return None
    src = "".join(lines)
    key = (filename, hash(src))
    headers = _trees.get(key)
    if headers is None:
        try:
            tree = ast.parse(src, filename)
        except SyntaxError:
            return None
        headers = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.With):
                end = max(i.context_expr.end_lineno or node.lineno for i in node.items)
                for line in range(node.lineno, end + 1):
                    headers[line] = node
        _trees[key] = headers
    node = headers.get(frame.f_lineno)
    if node is None:
        return None
    bkey = (filename, hash(src), node.lineno)
    body = _bodies.get(bkey)
    if body is None:
        _check_item(node)
        try:
            code = compile(ast.Module(body=node.body, type_ignores=[]), filename, "exec")
        except SyntaxError as e:
            raise TracingError(
                f"{filename}:{node.lineno}: the body of `with tracer.all()` / "
                f"`with tracer.iter[...]` runs once per generation step, as in nnsight, so it "
                f"cannot use `return`, `break`, `continue` or `yield` ({e.msg}); write "
                "`for step in tracer.iter[...]:` instead") from None
        body = Body(code=code, pure=all(_pure(s) for s in node.body), line=node.lineno)
        _bodies[bkey] = body
    return body


def _is_step_scope(expr: ast.expr) -> bool:
    """``tracer.all()`` / ``tracer.iter[...]`` (the forms nnsight documents)."""
    if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute):
        return expr.func.attr == "all"
    return isinstance(expr, ast.Subscript) and isinstance(expr.value, ast.Attribute) \
        and expr.value.attr == "iter"


def _check_item(node: ast.With) -> None:
    """The step scope must be the statement's last item: the body is re-run for the later
    steps after the items that follow it have already exited."""
    if len(node.items) > 1 and not _is_step_scope(node.items[-1].context_expr):
        raise TracingError(
            f"line {node.lineno}: put `tracer.all()` / `tracer.iter[...]` last in the `with` "
            "statement (its body runs once per generation step, inside the other items)")


def _pure(stmt: ast.stmt) -> bool:
    """Whether running ``stmt`` once for all steps is the same as once per step: it only
    records edits of module values, binds no names and has no other Python effects."""
    if isinstance(stmt, ast.Pass):
        return True
    if isinstance(stmt, ast.Expr):
        return isinstance(stmt.value, ast.Call) and _calls_pure(stmt.value) or \
            isinstance(stmt.value, ast.Constant)
    if isinstance(stmt, ast.Assign):
        return all(_point_target(t) for t in stmt.targets) and _calls_pure(stmt.value)
    if isinstance(stmt, ast.AugAssign):
        return _point_target(stmt.target) and _calls_pure(stmt.value)
    if isinstance(stmt, ast.For):
        return not stmt.orelse and _names_only(stmt.target) and _calls_pure(stmt.iter) and \
            all(_pure(s) for s in stmt.body)
    if isinstance(stmt, ast.If):
        return _calls_pure(stmt.test) and all(_pure(s) for s in (*stmt.body, *stmt.orelse))
    return False


def _names_only(target: ast.expr) -> bool:
    if isinstance(target, ast.Name):
        return True
    return isinstance(target, (ast.Tuple, ast.List)) and all(_names_only(e) for e in target.elts)


def _point_target(target: ast.expr) -> bool:
    """``m.layers[i].output[...]`` / ``m.layers[i].output``: a module value, not a container."""
    if not _calls_pure(target):
        return False
    node = target
    while isinstance(node, (ast.Subscript, ast.Attribute)):
        if isinstance(node, ast.Attribute) and node.attr in _POINTS:
            return True
        node = node.value
    return False


def _calls_pure(expr: ast.AST) -> bool:
    """Every call in ``expr`` is one that only records or computes (no Python effects)."""
    for node in ast.walk(expr):
        if isinstance(node, (ast.NamedExpr, ast.Yield, ast.YieldFrom, ast.Await, ast.Lambda)):
            return False
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name):
            if func.id not in _PURE_FUNCTIONS:
                return False
        elif isinstance(func, ast.Attribute):
            root = func.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if func.attr in _RANDOM or (func.attr not in _PURE_METHODS and not (
                    isinstance(root, ast.Name) and root.id in _PURE_MODULES)):
                return False
        else:
            return False
    return True


def rerun(frame: FrameType, body: Body, steps: Iterable[int],
          at_step: Callable[[int], None],
          rebound: Callable[[Any, Any], None]) -> None:
    """Run ``body`` once for each of ``steps`` in ``frame``'s names (``at_step(step)`` before
    each), then write the names it bound back into ``frame``.

    ``rebound(old, new)`` is called for each name whose value a step replaced (so the tracer
    can give a saved name the last step that ran, as nnsight does).
    """
    f_locals = frame.f_locals          # (before 3.13: a fresh snapshot of the fast locals)
    module_level = f_locals is frame.f_globals
    ns: dict[str, Any] = frame.f_globals if module_level else {**frame.f_globals, **f_locals}
    before = dict(ns) if module_level else dict(f_locals)
    last = dict(before)
    for step in steps:
        at_step(step)
        exec(body.code, ns)  # noqa: S102 -- the user's own block, as written in their file
        for name, value in ns.items():
            old = last.get(name)
            if old is not value:
                rebound(old, value)
                last[name] = value
    if module_level:
        return
    names = set(f_locals) | set(frame.f_code.co_varnames) | set(frame.f_code.co_cellvars) \
        | set(frame.f_code.co_freevars)
    updates = {n: ns[n] for n in names if n in ns and (n not in before or ns[n] is not before[n])}
    if not frame.f_code.co_flags & _CO_OPTIMIZED:
        f_locals.update(updates)   # a class body: f_locals is its namespace
        return
    if not updates:
        return
    for name, value in updates.items():
        f_locals[name] = value
    if sys.version_info < (3, 13):
        ctypes.pythonapi.PyFrame_LocalsToFast(ctypes.py_object(frame), ctypes.c_int(0))


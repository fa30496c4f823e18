"""The JSON form of nodes, written directly, renumbering node ids and tensor constants on the
way.

It is what ``Node.model_dump(mode="json")`` gives, in one pass. Splitting a 256-prompt,
30-layer capture trace into requests used to dump its 23,040 nodes with pydantic (64 ms)
and then rewrite their references in a second pass (60 ms). This single pass costs about a
third of that. ``tests/ir/test_jsonform.py`` holds it equal to pydantic's output for every
kind of value, so the schema stays the one definition of the format.

Example::

    >>> from vinterp.ir import Node, Ref
    >>> node_json(Node(id=7, op="save", args=[Ref(ref=5)], invoke=3), id=1, invoke=0,
    ...           refs={5: 0})["args"]
    [{'ref': 0}]
"""

from __future__ import annotations

from typing import Any

from vinterp.ir.schema import (
    DictV, DTypeV, EllipsisV, ListV, Node, Ref, SliceV, TensorRef, TupleV, Value,
)

_SCALARS = (type(None), bool, int, float, str)


def value_json(v: Value, refs: dict[int, int] | None = None,
               tensors: dict[int, int] | None = None) -> Any:
    """The JSON form of an IR value, with node ids mapped through ``refs`` and tensor
    constants through ``tensors`` (each left as it is when ``None``)."""
    t = type(v)
    if t in _SCALARS:
        return v
    if t is Ref:
        return {"ref": v.ref if refs is None else refs[v.ref]}  # type: ignore[union-attr]
    if t is TensorRef:
        i = v.tensor  # type: ignore[union-attr]
        return {"tensor": i if tensors is None else tensors[i]}
    if t is TupleV:
        return {"tuple": [value_json(x, refs, tensors) for x in v.tuple]}  # type: ignore
    if t is SliceV:
        return {"slice": [value_json(x, refs, tensors) for x in v.slice]}  # type: ignore
    if t is ListV:
        return {"list": [value_json(x, refs, tensors) for x in v.list]}  # type: ignore
    if t is DictV:
        return {"mapping": {k: value_json(x, refs, tensors)
                            for k, x in v.mapping.items()}}  # type: ignore[union-attr]
    if t is EllipsisV:
        return {"ellipsis": True}
    if t is DTypeV:
        return {"dtype": v.dtype}  # type: ignore[union-attr]
    if isinstance(v, _SCALARS[1:]):   # a subclass the schema let through (an IntEnum, say)
        return v
    raise TypeError(f"not an IR value: {v!r}")


def node_json(node: Node, *, id: int | None = None, invoke: int | None = None,  # noqa: A002
              refs: dict[int, int] | None = None,
              tensors: dict[int, int] | None = None) -> dict[str, Any]:
    """The JSON form of ``node``, optionally under a new ``id`` and ``invoke``, with its
    references and tensor constants renumbered (see :func:`value_json`)."""
    return {
        "id": node.id if id is None else id,
        "op": node.op,
        "args": [value_json(a, refs, tensors) for a in node.args],
        "kwargs": {k: value_json(v, refs, tensors) for k, v in node.kwargs.items()},
        "invoke": node.invoke if invoke is None else invoke,
        "steps": {"start": node.steps.start, "stop": node.steps.stop},
        "line": node.line,
    }

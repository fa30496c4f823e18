"""What each node of a graph uses, found in one walk and shared by everyone who asks.

Validation, invoke phases, cross-invoke imports and request splitting each need the node ids
and tensor constants every node refers to. A 256-prompt, 30-layer capture has 23,040 nodes;
walking their values once per question cost more than the walk itself is worth. The index
of a graph is built once, on first use, and kept while the graph lives (graphs are frozen, so
it can never go stale).

Example::

    >>> from vinterp.ir import Graph, Node, Ref
    >>> g = Graph(nodes=[Node(id=0, op="read", kwargs={"module": "m", "kind": "output"}),
    ...                  Node(id=1, op="save", args=[Ref(ref=0)])])
    >>> graph_index(g).refs
    [(), (0,)]
    >>> graph_index(g) is graph_index(g)
    True
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from vinterp.ir.schema import DictV, Graph, ListV, Node, Ref, SliceV, TensorRef, TupleV, Value

_CONTAINERS = (ListV, TupleV, SliceV, DictV)


def collect(value: Value, refs: list[int], tensors: list[int]) -> None:
    """Append the node ids (:class:`Ref`) and tensor-constant indices (:class:`TensorRef`)
    found anywhere inside ``value``.

    Plain recursion with exact type checks, not generators: graphs have tens of thousands of
    values.
    """
    t = type(value)
    if t is Ref:
        refs.append(value.ref)  # type: ignore[union-attr]
    elif t is TensorRef:
        tensors.append(value.tensor)  # type: ignore[union-attr]
    elif t in _CONTAINERS:
        if t is ListV:
            children: Any = value.list  # type: ignore[union-attr]
        elif t is TupleV:
            children = value.tuple  # type: ignore[union-attr]
        elif t is SliceV:
            children = value.slice  # type: ignore[union-attr]
        else:
            children = value.mapping.values()  # type: ignore[union-attr]
        for child in children:
            collect(child, refs, tensors)


def node_uses(node: Node) -> tuple[list[int], list[int]]:
    """The node ids and tensor constants ``node`` uses, in argument order (repeats kept)."""
    refs: list[int] = []
    tensors: list[int] = []
    for v in node.args:
        collect(v, refs, tensors)
    for v in node.kwargs.values():
        collect(v, refs, tensors)
    return refs, tensors


class GraphIndex:
    """Per node (in the order of ``graph.nodes``): the node ids and tensor constants it uses;
    and each node id's invoke (``owner``). Built by :func:`graph_index`."""

    __slots__ = ("refs", "tensors", "owner", "position")

    def __init__(self, graph: Graph) -> None:
        # Tuples, and the one empty tuple for nodes that use nothing: the index lives as long
        # as its graph, and 46,080 lists for a 23,040-node graph made Python's cyclic
        # collector's next pass over them cost more than building them did.
        refs: list[tuple[int, ...]] = []
        tensors: list[tuple[int, ...]] = []
        for n in graph.nodes:
            r, t = node_uses(n)
            refs.append(tuple(r) if r else ())
            tensors.append(tuple(t) if t else ())
        self.refs = refs
        self.tensors = tensors
        self.owner: dict[int, int] = {n.id: n.invoke for n in graph.nodes}
        self.position: dict[int, int] = {n.id: k for k, n in enumerate(graph.nodes)}


# id(graph) -> its index; an entry leaves when its graph is collected. (Not a
# WeakKeyDictionary: that hashes and compares its keys, and a frozen pydantic graph hashes
# and compares all of its nodes.)
_INDEXES: dict[int, GraphIndex] = {}
_LOCK = threading.Lock()


def graph_index(graph: Graph) -> GraphIndex:
    """The :class:`GraphIndex` of ``graph``, built on first use and kept while it lives."""
    key = id(graph)
    found = _INDEXES.get(key)
    if found is not None:
        return found
    index = GraphIndex(graph)
    with _LOCK:
        if key not in _INDEXES:
            _INDEXES[key] = index
            weakref.finalize(graph, _INDEXES.pop, key, None)
        return _INDEXES[key]

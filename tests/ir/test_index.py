"""The shared per-graph index (vinterp/ir/index.py): right, built once, gone with its graph."""

from __future__ import annotations

import gc

from vinterp.ir import Graph, ListV, Node, Ref, SliceV, TensorRef, TupleV
from vinterp.ir import index as ix


def _graph() -> Graph:
    return Graph(nodes=(
        Node(id=0, op="read", kwargs={"module": "model.layers.0", "kind": "output"}),
        Node(id=1, op="getitem", invoke=1, args=(Ref(ref=0), TupleV(tuple=(
            SliceV(slice=(None, Ref(ref=0), None)), ListV(list=(TensorRef(tensor=2),)))))),
        Node(id=5, op="add", args=(Ref(ref=1), Ref(ref=1), TensorRef(tensor=0))),
    ))


def test_refs_tensors_and_owners_of_every_node():
    idx = ix.graph_index(_graph())
    assert idx.refs == [(), (0, 0), (1, 1)]
    assert idx.tensors == [(), (2,), (0,)]
    assert idx.owner == {0: 0, 1: 1, 5: 0}
    assert idx.refs[idx.position[5]] == (1, 1)


def test_built_once_per_graph_and_dropped_with_it():
    g = _graph()
    assert ix.graph_index(g) is ix.graph_index(g)
    other = _graph()                       # an equal graph is another graph
    assert ix.graph_index(other) is not ix.graph_index(g)
    key = id(g)
    del g
    gc.collect()
    assert key not in ix._INDEXES

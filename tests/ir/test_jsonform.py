"""The JSON form of nodes written directly (vinterp/ir/jsonform.py): pydantic's, renumbered."""

from __future__ import annotations

import enum
import math

from vinterp.ir import (
    DTypeV, EllipsisV, ListV, Node, Ref, SliceV, Steps, TensorRef, TupleV,
)
from vinterp.ir.jsonform import node_json
from vinterp.ir.schema import DictV


class _Color(enum.IntEnum):
    RED = 1


# every kind of IR value, nested the ways traces nest them
_VALUES = (
    None, True, False, 0, -3, 2.5, "text", Ref(ref=4), TensorRef(tensor=1), EllipsisV(),
    DTypeV(dtype="bfloat16"),
    SliceV(slice=(None, Ref(ref=2), -1)),
    TupleV(tuple=(SliceV(slice=(None, None, None)), -1, EllipsisV())),
    ListV(list=(0, Ref(ref=3), ListV(list=()))),
    # user dicts whose keys look like the IR's own: data, never references
    DictV(mapping={"ref": 7, "tensor": TensorRef(tensor=0), "x": Ref(ref=2)}),
)


def _node() -> Node:
    return Node(id=9, op="call", args=_VALUES, invoke=2, steps=Steps(start=1, stop=None),
                line="probe.py:12",
                kwargs={"fn": "torch.where", "k": TupleV(tuple=(Ref(ref=4), 1.5))})


def test_equals_pydantic_for_every_kind_of_value():
    n = _node()
    assert node_json(n) == n.model_dump(mode="json")
    plain = Node(id=0, op="read", kwargs={"module": "model.layers.0", "kind": "output"})
    assert node_json(plain) == plain.model_dump(mode="json")


def test_subclassed_scalars_and_non_finite_floats_stay_themselves():
    n = Node(id=0, op="method", args=(_Color.RED, float("-inf")),
             kwargs={"name": "clamp", "max": float("inf"), "min": float("nan")})
    d = node_json(n)
    assert d == {**n.model_dump(mode="json"), "kwargs": d["kwargs"]}
    assert d["args"] == [1, float("-inf")] and d["kwargs"]["max"] == float("inf")
    assert math.isnan(d["kwargs"]["min"])


def test_renumbers_ids_references_and_constants_but_not_user_data():
    n = _node()
    refs = {2: 0, 3: 1, 4: 2}
    d = node_json(n, id=5, invoke=0, refs=refs, tensors={0: 0, 1: 3})
    assert (d["id"], d["invoke"]) == (5, 0)
    args = d["args"]
    assert args[7] == {"ref": 2} and args[8] == {"tensor": 3}
    assert args[11] == {"slice": [None, {"ref": 0}, -1]}
    assert args[13] == {"list": [0, {"ref": 1}, {"list": []}]}
    assert args[14] == {"mapping": {"ref": 7, "tensor": {"tensor": 0}, "x": {"ref": 0}}}
    assert d["kwargs"]["k"] == {"tuple": [{"ref": 2}, 1.5]}
    # what is not renumbered is as pydantic writes it
    assert {k: v for k, v in d.items() if k not in ("id", "invoke", "args", "kwargs")} == \
        {k: v for k, v in n.model_dump(mode="json").items()
         if k not in ("id", "invoke", "args", "kwargs")}

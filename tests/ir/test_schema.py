"""IR schema: versioned JSON encoding, tensors as dtype + shape + base64, JSON Schema."""

from __future__ import annotations

import json

import pytest
import torch

from vinterp import ir
from vinterp.ir import (
    DTypeV, EllipsisV, Graph, Invoke, ListV, Node, Ref, SliceV, Steps, TensorRef, TupleV,
)


def _graph():
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    return Graph(
        invokes=(Invoke(prompts=((1, 2, 3),)),),
        nodes=(
            Node(id=0, op="read", kwargs={"module": "model.layers.0", "kind": "output"}),
            Node(id=1, op="getitem", args=(Ref(ref=0), TupleV(tuple=(
                SliceV(slice=(None, None, None)), EllipsisV(), ListV(list=(0, 1)))))),
            Node(id=2, op="method", args=(Ref(ref=1), DTypeV(dtype="float16")),
                 kwargs={"name": "to"}),
            Node(id=3, op="add", args=(Ref(ref=2), TensorRef(tensor=0)),
                 steps=Steps(start=0, stop=None)),
            Node(id=4, op="save", args=(Ref(ref=3),)),
        ),
        tensors=(ir.encode_tensor(t),),
    )


def test_json_roundtrip_is_identical():
    g = _graph()
    text = ir.dumps(g)
    assert json.loads(text)["version"] == ir.IR_VERSION == 1
    again = ir.load(text)
    assert again == g
    assert ir.dumps(again) == text
    assert ir.load(ir.to_dict(g)) == g


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64,
                                   torch.int8, torch.int16, torch.int32, torch.int64,
                                   torch.uint8, torch.bool])
def test_tensor_encoding_roundtrip(dtype):
    t = (torch.randn(3, 4) * 10).to(dtype)
    td = ir.encode_tensor(t)
    assert td.dtype == str(dtype).replace("torch.", "") and td.shape == (3, 4)
    assert torch.equal(ir.decode_tensor(td), t)


def test_unsupported_dtype_refused():
    with pytest.raises(TypeError, match="cannot be sent"):
        ir.encode_tensor(torch.zeros(2, dtype=torch.complex64))


def test_json_schema_published():
    schema = ir.json_schema()
    assert schema["title"] == "Graph"
    text = json.dumps(schema)
    for name in ("Node", "TensorData", "Ref", "Steps", "Invoke"):
        assert name in schema["$defs"]
    assert "base64" in text
    assert schema["$defs"]["TensorData"]["properties"]["dtype"]["enum"][0] == "float16"


def test_no_callables_or_pickle_possible():
    # values are JSON scalars or IR value types only; anything else is refused
    with pytest.raises(ValueError, match="not an IR value"):
        Node(id=0, op="save", args=(print,))
    with pytest.raises(ir.GraphError, match="nodes.0.args.0\n  not an IR value"):
        ir.load({"nodes": [{"id": 0, "op": "save", "args": [{"pickle": "gASVAAA="}]}]})
    with pytest.raises(ir.GraphError, match="nodes.0.extra\n  Extra inputs are not permitted"):
        ir.load({"nodes": [{"id": 0, "op": "read", "extra": 1,
                            "kwargs": {"module": "", "kind": "output"}}]})


def test_non_finite_numbers_survive_json():
    # clamp(max=float("inf")) or a -inf mask fill must not turn into null on the way to a
    # worker or a server (pydantic's default JSON writes inf and nan as null)
    g = Graph(invokes=(Invoke(prompts=((1,),)),), nodes=(
        Node(id=0, op="read", kwargs={"module": "model.layers.0", "kind": "output"}),
        Node(id=1, op="method", args=(Ref(ref=0), float("-inf")),
             kwargs={"name": "clamp", "max": float("inf")}),
        Node(id=2, op="method", args=(Ref(ref=0), float("nan")), kwargs={"name": "add"}),
    ))
    back = ir.load(ir.dumps(g))
    assert back.nodes[1].args[1] == float("-inf")
    assert back.nodes[1].kwargs["max"] == float("inf")
    assert back.nodes[2].args[1] != back.nodes[2].args[1]   # nan

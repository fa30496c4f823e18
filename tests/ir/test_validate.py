"""``vinterp.ir.load`` rejects bad graphs with messages naming the node."""

from __future__ import annotations

import base64

import pytest

from vinterp import ir
from vinterp.ir import GraphError


def _read(i=0):
    return {"id": i, "op": "read", "kwargs": {"module": "model.layers.0", "kind": "output"}}


def test_unknown_op():
    with pytest.raises(GraphError, match=r"node 0: unknown op 'exec'"):
        ir.load({"nodes": [{"id": 0, "op": "exec"}]})


@pytest.mark.parametrize("node,msg", [
    ({"id": 1, "op": "method", "args": [{"ref": 0}], "kwargs": {"name": "__reduce__"}},
     "tensor method '__reduce__'"),
    ({"id": 1, "op": "call", "args": [{"ref": 0}], "kwargs": {"fn": "os.system"}},
     "function 'os.system'"),
    ({"id": 1, "op": "getattr", "args": [{"ref": 0}], "kwargs": {"name": "__class__"}},
     "attribute '__class__'"),
    ({"id": 1, "op": "getattr", "args": [{"ref": 0}], "kwargs": {"name": "_modules"}},
     "attribute '_modules' is neither"),
    ({"id": 1, "op": "getattr", "args": [{"ref": 0}], "kwargs": {"name": "a.b"}},
     "attribute 'a.b' is neither"),
    ({"id": 1, "op": "read", "kwargs": {"module": "x", "kind": "weights"}}, "point kind"),
    ({"id": 1, "op": "call", "args": [{"ref": 0}], "kwargs": {"fn": "torch.abs",
                                                            "out": {"ref": 0}}},
     "'out=' is not supported"),
])
def test_non_allowlisted_names(node, msg):
    with pytest.raises(GraphError, match=r"node 1: .*" + msg):
        ir.load({"nodes": [_read(), node]})


def test_a_grad_bound_to_a_backward_block_must_name_a_backward():
    grad = {"id": 1, "op": "getattr", "args": [{"ref": 0}],
            "kwargs": {"name": "grad", "backward": {"ref": 0}}}
    with pytest.raises(GraphError, match=r"node 1: 'backward' refers to node 0, which is not"):
        ir.load({"nodes": [_read(), grad]})
    shape = {**grad, "kwargs": {"name": "shape", "backward": {"ref": 0}}}
    with pytest.raises(GraphError, match=r"node 1: getattr's 'backward'"):
        ir.load({"nodes": [_read(), shape]})
    back = {"id": 1, "op": "backward", "args": [{"ref": 0}]}
    ir.load({"nodes": [_read(), back, {**grad, "id": 2, "kwargs": {
        "name": "grad", "backward": {"ref": 1}}}]})


def test_dangling_reference():
    with pytest.raises(GraphError, match=r"node 1: argument refers to node 7, a node that does"):
        ir.load({"nodes": [_read(), {"id": 1, "op": "save", "args": [{"ref": 7}]}]})


def test_cycle_forward_reference():
    nodes = [_read(), {"id": 1, "op": "add", "args": [{"ref": 0}, {"ref": 2}]},
             {"id": 2, "op": "add", "args": [{"ref": 1}, 1]}]
    with pytest.raises(GraphError, match=r"node 1: .*node 2, a later node \(cycle\)"):
        ir.load({"nodes": nodes})
    with pytest.raises(GraphError, match="node 0: .*cycle|node 0: .*does not exist"):
        ir.load({"nodes": [{"id": 0, "op": "add", "args": [{"ref": 0}, 1]}]})


def test_duplicate_ids_and_bad_invoke():
    with pytest.raises(GraphError, match="node 0: duplicate"):
        ir.load({"nodes": [_read(), _read()]})
    with pytest.raises(GraphError, match="node 0: invoke 3 does not exist"):
        ir.load({"invokes": [{"prompts": [[1]]}], "nodes": [{**_read(), "invoke": 3}]})


def test_wrong_dtype():
    with pytest.raises(GraphError, match="dtype"):
        ir.load({"tensors": [{"dtype": "complex128", "shape": [1], "data": "AAAAAAAAAAA="}]})


def test_oversize_constant():
    data = base64.b64encode(bytes(4 * 1000)).decode()
    td = {"dtype": "float32", "shape": [1000], "data": data}
    ir.load({"tensors": [td]})
    with pytest.raises(GraphError, match=r"tensor constant 0 .* 4000 bytes; the limit is 100"):
        ir.load({"tensors": [td]}, max_tensor_bytes=100)
    with pytest.raises(GraphError, match="total"):
        ir.load({"tensors": [td, td]}, max_total_tensor_bytes=5000)


def test_malformed_base64_and_length_mismatch():
    with pytest.raises(GraphError, match="tensor constant 0: .*base64"):
        ir.load({"tensors": [{"dtype": "float32", "shape": [2], "data": "AAAA"}]})
    bad = {"dtype": "float32", "shape": [2], "data": "!!!!!!!!!!!!"}  # right length
    with pytest.raises(GraphError, match="tensor constant 0: data is not valid base64"):
        ir.load({"tensors": [bad]})
    good = {"dtype": "float32", "shape": [2], "data": base64.b64encode(bytes(8)).decode()}
    assert ir.load({"tensors": [good]}).tensors[0].shape == (2,)


def test_missing_tensor_constant():
    with pytest.raises(GraphError, match="node 1: tensor constant 4 does not exist"):
        ir.load({"nodes": [_read(), {"id": 1, "op": "add", "args": [{"ref": 0}, {"tensor": 4}]}]})


def test_too_many_nodes_and_empty_steps():
    with pytest.raises(GraphError, match="limit"):
        ir.load({"nodes": [_read(i) for i in range(3)]}, max_nodes=2)
    with pytest.raises(GraphError, match="empty step range"):
        ir.load({"nodes": [{**_read(), "steps": {"start": 3, "stop": 2}}]})


def test_messages_name_the_user_line():
    with pytest.raises(GraphError, match=r"node 0 \(script.py:12\): unknown op"):
        ir.load({"nodes": [{"id": 0, "op": "eval", "line": "script.py:12"}]})


def test_trace_graph_validates(hf_model):
    model = hf_model("tiny-gpt2")
    with model.trace("Hello") as tracer:
        model.layers[0].output.save()
    g = tracer.graph
    assert [n.op for n in g.nodes] == ["read", "save"]
    assert g.nodes[0].kwargs == {"module": "transformer.h.0", "kind": "output"}
    assert ir.load(tracer.to_json()) == g


@pytest.mark.parametrize("bad", [[1, 2], {"foo": 1}, {"ref": 0, "tensor": 0}])
def test_a_value_that_is_no_ir_value_says_what_values_may_be(bad):
    with pytest.raises(GraphError, match=r"nodes\.1\.args\.0\n.*not an IR value: expected null, "
                                         r"a bool, number or string, or an object with exactly "
                                         r"one of the keys ref, tensor"):
        ir.load({"nodes": [_read(), {"id": 1, "op": "save", "args": [bad]}]})


def test_values_keep_their_json_type():
    g = ir.load({"nodes": [_read(), {"id": 1, "op": "method", "args": [
        {"ref": 0}, 1, 1.0, True, None, "s",
        {"tuple": [{"slice": [None, -1, None]}, {"ellipsis": True}]},
        {"mapping": {"tensor": 5}}], "kwargs": {"name": "add"}}]})
    # (a user dict whose key is "tensor" stays a dict)
    args = g.nodes[1].args
    assert [type(a).__name__ for a in args] == [
        "Ref", "int", "float", "bool", "NoneType", "str", "TupleV", "DictV"]
    assert args[7].mapping == {"tensor": 5}


def test_node_refs_walk_nested_values():
    g = ir.load({"nodes": [_read(0), _read(1), {"id": 2, "op": "method", "args": [
        {"ref": 0}, {"list": [{"tuple": [{"ref": 1}, {"slice": [{"ref": 0}, None, None]}]}]}],
        "kwargs": {"name": "add", "alpha": {"mapping": {"k": {"ref": 1}}}}}]},
    )
    assert ir.validate.node_refs(g.nodes[2]) == [0, 1, 0, 1]


def test_field_reads_run_only_on_structured_values():
    """A getattr outside the allowlist is a field of a ModelOutput, dataclass or named tuple,
    checked when it runs: a tensor's other attributes and an object's are refused."""
    import dataclasses
    from collections import namedtuple

    import torch
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    from vinterp.ir.ops import read_attribute

    @dataclasses.dataclass
    class Out:
        a: torch.Tensor

    t = torch.ones(2)
    assert read_attribute(Out(t), "a") is t
    assert read_attribute(namedtuple("NT", "a b")(t, 1), "a") is t
    assert read_attribute(BaseModelOutputWithPooling(pooler_output=t), "pooler_output") is t
    assert read_attribute(t, "shape") == torch.Size([2])
    with pytest.raises(AttributeError, match="'requires_grad' is not available on a tensor"):
        read_attribute(t, "requires_grad")
    with pytest.raises(AttributeError, match=r"a Out has no field 'b'; its fields are \['a'\]"):
        read_attribute(Out(t), "b")
    with pytest.raises(AttributeError, match=r"read its entries as value\[key\]"):
        read_attribute({"a": t}, "a")
    with pytest.raises(AttributeError, match="a Linear has no field 'weight'"):
        read_attribute(torch.nn.Linear(2, 2), "weight")


@pytest.mark.parametrize("mode,positions,ok", [
    ("trace", [-3, 0, 2], True), ("trace", -4, False), ("trace", [3], False),
    ("generate", [4], True), ("generate", [5], False), ("generate", [-4], False),
    ("trace", "generated", True), ("trace", {"slice": [-50, None, None]}, True),
    ("trace", [-50, 1], True),   # (a list may name positions only some prompts have)
])
def test_steering_positions_the_invoke_does_not_have(mode, positions, ok):
    """Steering positions that name no token of the invoke (the prompt's 3, then 3 new tokens
    of which the last never runs through the model) select no row: the op silently did
    nothing in the library, where the server refused the same positions."""
    steer = {"id": 1, "op": "scale", "args": [{"ref": 0}],
             "kwargs": {"factor": 2.0, "positions": {"list": positions}
                        if isinstance(positions, list) else positions}}
    graph = {"mode": mode, "invokes": [{"prompts": [[1, 2, 3]]}], "nodes": [_read(), steer],
             "generation": {"max_new_tokens": 3} if mode == "generate" else {}}
    if ok:
        ir.load(graph)
    else:
        with pytest.raises(GraphError, match=r"node 1: steering positions \[-?\d+\] name no token "
                                             r"of this invoke .*would change nothing"):
            ir.load(graph)


def test_token_inputs_need_one_entry_per_token_of_each_prompt():
    """An invoke's per-token inputs (``token_type_ids``...) must fit its prompts: the hf
    backend pads them with the ids, so a wrong length would shift every segment id."""
    import torch

    from vinterp.ir.tensors import encode_tensor

    def graph(token_inputs, types):
        return {"invokes": [{"prompts": [[5, 6, 7]], "token_inputs": token_inputs}],
                "tensors": [encode_tensor(types).model_dump()], "nodes": [_read()]}

    ok = ir.load(graph([{"token_type_ids": {"tensor": 0}}], torch.tensor([0, 1, 1])))
    assert ok.invokes[0].token_inputs[0]["token_type_ids"].tensor == 0
    with pytest.raises(GraphError, match=r"invoke 0: token_inputs\[0\].token_type_ids has "
                                         r"shape \[2\]; it needs one entry per token"):
        ir.load(graph([{"token_type_ids": {"tensor": 0}}], torch.tensor([0, 1])))
    with pytest.raises(GraphError, match="token_inputs has 2 entries for 1 prompts"):
        ir.load(graph([{}, {}], torch.tensor([0, 1, 1])))
    with pytest.raises(GraphError, match="refers to missing tensor 3"):
        ir.load(graph([{"token_type_ids": {"tensor": 3}}], torch.tensor([0, 1, 1])))

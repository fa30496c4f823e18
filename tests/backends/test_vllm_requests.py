"""Splitting a graph into per-request graphs (vinterp/backends/vllm/requests.py)."""

from __future__ import annotations

import json

import torch

from vinterp import ir
from vinterp.backends.vllm.requests import GraphSplitter, fingerprint
from vinterp.ir.ops import acts_on_prompt, writes
from vinterp.ir.tensors import decode_tensor, encode_tensor


def _graph() -> ir.Graph:
    t = [encode_tensor(torch.full((2,), float(k))).model_dump() for k in range(3)]
    read = {"op": "read", "kwargs": {"module": "model.layers.0", "kind": "output"}}
    return ir.load({
        "invokes": [{"prompts": [[1, 2]]}, {"prompts": [[3]]}],
        "tensors": t,
        "nodes": [
            {"id": 0, **read, "invoke": 0},
            {"id": 1, "op": "steer", "args": [{"ref": 0}], "invoke": 0,
             "kwargs": {"vector": {"tensor": 0}}},
            {"id": 2, **read, "invoke": 1},
            # a user dict whose key happens to be "tensor" next to a real constant
            {"id": 3, "op": "method", "invoke": 1, "args": [
                {"ref": 2}, {"mapping": {"tensor": 1}}, {"list": [{"tensor": 2}]}],
             "kwargs": {"name": "add"}},
            {"id": 4, "op": "save", "args": [{"ref": 3}], "invoke": 1},
        ],
    })


def test_each_request_carries_only_its_nodes_and_constants():
    split = GraphSplitter(_graph())
    g0 = ir.load(split.subgraph_json(0))
    assert [n.id for n in g0.nodes] == [0, 1]
    assert len(g0.tensors) == 1 and decode_tensor(g0.tensors[0]).tolist() == [0.0, 0.0]
    g1 = ir.load(split.subgraph_json(1))
    assert [n.id for n in g1.nodes] == [2, 3, 4]
    # constant 2 is renumbered to 0; the user dict {"tensor": 1} is data and stays as it is
    args = json.loads(split.subgraph_json(1))["nodes"][1]["args"]
    assert args[1] == {"mapping": {"tensor": 1}} and args[2] == {"list": [{"tensor": 0}]}
    assert decode_tensor(g1.tensors[0]).tolist() == [2.0, 2.0]
    assert g1.invokes[1].prompts == ((3,),) and g1.invokes[0].prompts == ()


def test_compact_request_graphs_are_equal_for_equal_invokes():
    read = {"op": "read", "kwargs": {"module": "model.layers.0", "kind": "output"}}
    nodes = []
    for inv in range(2):   # two invokes doing the same (a loop over prompts)
        base = 10 * inv
        nodes += [
            {"id": base, **read, "invoke": inv, "line": "x.py:3"},
            {"id": base + 1, "op": "getitem", "invoke": inv, "line": "x.py:4", "args": [
                {"ref": base}, {"tuple": [{"slice": [None, None, None]}, -1]}]},
            # a user dict whose key is "ref": data, not a reference
            {"id": base + 2, "op": "method", "invoke": inv, "line": "x.py:5",
             "args": [{"ref": base + 1}, {"mapping": {"ref": 7}}], "kwargs": {"name": "add"}},
            {"id": base + 3, "op": "save", "args": [{"ref": base + 2}], "invoke": inv,
             "line": "x.py:6"},
        ]
    graph = ir.load({"invokes": [{"prompts": [[1, 2]]}, {"prompts": [[3, 4, 5]]}],
                     "nodes": nodes})
    split = GraphSplitter(graph)
    (t0, ids0), (t1, ids1) = split.request_json(0), split.request_json(1)
    assert ids0 == [0, 1, 2, 3] and ids1 == [10, 11, 12, 13]
    g1 = ir.load(t1)
    assert [n.id for n in g1.nodes] == [0, 1, 2, 3] and {n.invoke for n in g1.nodes} == {0}
    assert json.loads(t1)["nodes"][2]["args"] == [{"ref": 1}, {"mapping": {"ref": 7}}]
    # prompts travel in the request itself: the graph keeps their lengths
    assert g1.invokes[0].prompts == ((0, 0, 0),) and len(g1.invokes) == 1
    # the prompts differ, the intervention does not: the nodes are the same text
    assert json.loads(t0)["nodes"] == json.loads(t1)["nodes"]
    assert t0 != t1    # ... but these prompts have different lengths


def test_invokes_using_other_invokes_are_not_compacted():
    read = {"op": "read", "kwargs": {"module": "model.layers.0", "kind": "output"}}
    graph = ir.load({"invokes": [{"prompts": [[1]]}, {"prompts": [[2]]}], "nodes": [
        {"id": 0, **read, "invoke": 0},
        {"id": 1, "op": "write", "args": [{"ref": 0}], "invoke": 1,
         "kwargs": {"module": "model.layers.0", "kind": "output"}},
    ]})
    split = GraphSplitter(graph)
    assert split.request_json(1) is None
    assert split.request_json(0) is not None


def test_request_graphs_keep_non_finite_numbers():
    graph = ir.load({"invokes": [{"prompts": [[1, 2]]}], "nodes": [
        {"id": 0, "op": "read", "kwargs": {"module": "model.layers.0", "kind": "output"}},
        {"id": 1, "op": "method", "args": [{"ref": 0}, float("-inf")],
         "kwargs": {"name": "clamp", "max": float("inf")}},
    ]})
    text, _ = GraphSplitter(graph).request_json(0)
    node = ir.load(text).nodes[1]
    assert node.args[1] == float("-inf") and node.kwargs["max"] == float("inf")


def test_the_default_kv_cache_follows_the_environment(monkeypatch, tiny_model_path):
    """``VINTERP_KV_CACHE_BYTES`` sets the default KV cache; an explicit argument wins."""
    from vinterp.backends.vllm.engine import (
        DEFAULT_KV_CACHE_BYTES, KV_CACHE_ENV, engine_kwargs,
    )

    path = tiny_model_path("tiny-llama")
    monkeypatch.delenv(KV_CACHE_ENV, raising=False)
    assert engine_kwargs(path)["kv_cache_memory_bytes"] == DEFAULT_KV_CACHE_BYTES
    monkeypatch.setenv(KV_CACHE_ENV, str(2**28))
    assert engine_kwargs(path)["kv_cache_memory_bytes"] == 2**28
    assert engine_kwargs(path, kv_cache_memory_bytes=2**27)["kv_cache_memory_bytes"] == 2**27


def _call(fn: str, *args: object, **kwargs: object) -> ir.Node:
    return ir.Node(id=1, op="call", args=(ir.Ref(ref=0), *args), kwargs={"fn": fn, **kwargs})


def test_what_counts_as_a_write():
    """The prefix cache isolates writers (``cache_salt``): a function called in place is one,
    by keyword or position; the same function returning a new tensor is not."""
    relu = "torch.nn.functional.relu"
    assert writes([_call(relu, inplace=True)]) and writes([_call(relu, True)])
    assert not writes([_call(relu)]) and not writes([_call(relu, inplace=False)])
    assert not writes([_call("torch.abs")])
    assert writes([ir.Node(id=1, op="method", args=(ir.Ref(ref=0), 2.0),
                           kwargs={"name": "mul_"})])
    assert writes([ir.Node(id=1, op="iadd", args=(ir.Ref(ref=0), 1.0))])


def test_a_prompt_write_skips_the_cache_and_imports_salt_it():
    """A write at step 0 needs the prompt computed by its own request, even with nothing
    read there; the values patched in from other invokes are part of the salt."""
    write = ir.Node(id=1, op="write", args=(ir.Ref(ref=0),),
                    kwargs={"module": "model.layers.0", "kind": "output"})
    later = write.model_copy(update={"steps": ir.Steps(start=1, stop=2)})
    assert acts_on_prompt([write]) and not acts_on_prompt([later])
    one, two = ({"0": encode_tensor(torch.full((2,), v)).model_dump()} for v in (1.0, 2.0))
    assert len({fingerprint("g"), fingerprint("g", one), fingerprint("g", two)}) == 3
    assert fingerprint("g", {}) == fingerprint("g")

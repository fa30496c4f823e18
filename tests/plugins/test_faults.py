"""A failing intervention fails only its own request; the engine and its neighbours go on."""

from __future__ import annotations

import pytest
import torch
from helpers import capture_graph, steer_graph

from vinterp.backends.vllm import requests as rq
from vinterp.backends.vllm.backend import Job
from vinterp.ir import Graph, Invoke, Node, Ref, TensorRef, TupleV, encode_tensor
from vinterp.ir.interpreter import InterventionError
from vinterp_vllm.payload import Payload


def _jobs(graph: Graph, tag: str) -> list:
    out = []
    for i, inv in enumerate(graph.invokes):
        payload = Payload(key=f"{tag}/{i}", graph_json=rq.subgraph_json(graph, i), invoke=i,
                          mode=graph.mode)
        out.append(Job((tag, i), list(inv.prompts[0]), payload, graph, i))
    return out


def _bad_setitem(prompt: list[int]) -> Graph:
    # layer 0 output [1, n, 64] gets a [3, 5] value: a shape mismatch at run time
    return Graph(invokes=(Invoke(prompts=(tuple(prompt),)),), nodes=(
        Node(id=0, op="read", kwargs={"module": "model.layers.0", "kind": "output"}),
        Node(id=1, op="setitem", args=(Ref(ref=0), TupleV(tuple=()), TensorRef(tensor=0))),
        Node(id=2, op="save", args=(Ref(ref=0),)),
    ), tensors=(encode_tensor(torch.ones(3, 5)),))


def test_bad_requests_fail_alone(tiny_vllm):
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 16]]
    good = steer_graph(prompts, [{"layer": 1, "vector": torch.ones(64), "scale": 2.0}, None],
                       max_new_tokens=4)
    wrong_size = steer_graph([prompts[0]], [{"layer": 0, "vector": torch.ones(7)}],
                             max_new_tokens=4)
    outcomes: dict = {}
    generated: dict = {}
    tiny_vllm._generate(_jobs(good, "good") + _jobs(wrong_size, "size")
                        + _jobs(_bad_setitem(prompts[1]), "shape"), outcomes, generated)
    assert "hidden size is 64" in outcomes[("size", 0)].error
    assert "cannot assign a value of shape [3, 5]" in outcomes[("shape", 0)].error
    assert outcomes[("good", 0)].error is None and outcomes[("good", 1)].error is None
    alone = tiny_vllm.run(good)
    assert generated[("good", 0)].tolist() == alone.generated[0].tolist()
    assert generated[("good", 1)].tolist() == alone.generated[1].tolist()
    # the trace that failed raises a clear error; the engine still serves the next one
    with pytest.raises(InterventionError, match="cannot assign"):
        tiny_vllm.run(_bad_setitem(prompts[1]))
    graph, saves = capture_graph([prompts[0]], ["model.layers.1"])
    assert tiny_vllm.run(graph).saves[saves[0]].shape == (1, 5, 64)


def test_refusals_at_trace_time(tiny_vllm):
    graph, _ = capture_graph([[5, 6, 7]], ["model.layers.0.self_attn.q_proj"])
    with pytest.raises(ValueError, match="not available on the vllm backend"):
        tiny_vllm.check(graph)
    long = _bad_setitem(list(range(3, 60)))  # a general graph, 57 tokens > 32-token chunks
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        tiny_vllm.check(long)

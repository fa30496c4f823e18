"""GraphRunner, backend-neutral: fed fake point events, checked against hand torch math."""

from __future__ import annotations

import re

import pytest
import torch

from vinterp import ir
from vinterp.ir.errors import InterventionError
from vinterp.ir.interpreter import GraphRunner
from vinterp.ir.phases import cross_refs, invoke_phases


class FakeEvent:
    def __init__(self, module, kind, values, step=0):
        self.module, self.kind, self.step, self.values = module, kind, step, values

    def get(self, invoke):
        return self.values[invoke]

    def set(self, invoke, value):
        self.values[invoke] = value

    def row_positions(self, invoke):
        return torch.arange(self.values[invoke].shape[-2]).unsqueeze(0)

    def prompt_lens(self, invoke):
        return torch.tensor([[self.values[invoke].shape[-2]]])


def _read(i, module="m", invoke=0):
    return {"id": i, "op": "read", "invoke": invoke, "kwargs": {"module": module, "kind": "output"}}


def test_ops_saves_snapshots_and_setitem():
    g = ir.load({"invokes": [{"prompts": [[1, 2]]}], "nodes": [
        _read(0),
        {"id": 1, "op": "save", "args": [{"ref": 0}]},
        {"id": 2, "op": "method", "args": [{"ref": 0}], "kwargs": {"name": "sum", "dim": -1}},
        {"id": 3, "op": "save", "args": [{"ref": 2}]},
        {"id": 4, "op": "setitem", "args": [{"ref": 0}, {"slice": [None, None, None]}, 0.0]},
        {"id": 5, "op": "call", "args": [{"ref": 0}], "kwargs": {"fn": "torch.exp"}},
        {"id": 6, "op": "save", "args": [{"ref": 5}]},
    ]})
    x = torch.arange(6.0).reshape(1, 2, 3)
    runner = GraphRunner(g)
    runner.begin_step(0)
    ev = FakeEvent("m", "output", {0: x.clone()})
    runner.on_event(ev)
    runner.end_step()
    res = runner.results()
    assert torch.equal(res[1], x)  # snapshot before the in-place zeroing
    assert torch.equal(res[3], x.sum(-1))
    assert torch.equal(res[6], torch.ones(1, 2, 3))
    assert torch.equal(ev.values[0], torch.zeros(1, 2, 3))  # wrote through


def test_never_reached_point_names_node():
    g = ir.load({"invokes": [{"prompts": [[1]]}], "nodes": [_read(0, "nowhere")]})
    runner = GraphRunner(g)
    runner.begin_step(0)
    with pytest.raises(InterventionError, match=r"node 0 \[read nowhere.output\].*never reached"):
        runner.end_step()


def test_constructor_size_limit():
    g = ir.load({"nodes": [{"id": 0, "op": "call", "invoke": -1, "args": [100000, 100000],
                            "kwargs": {"fn": "torch.zeros"}}]})
    runner = GraphRunner(g)
    with pytest.raises(InterventionError, match="would allocate"):
        runner.begin_step(0)


def test_invoke_phases_orders_dependencies():
    g = ir.load({"invokes": [{"prompts": [[1]]}, {"prompts": [[2]]}, {"prompts": [[3]]}],
                 "nodes": [_read(0, invoke=2), _read(1, invoke=1),
                           {"id": 2, "op": "add", "invoke": 0, "args": [{"ref": 0}, {"ref": 1}]}]})
    assert invoke_phases(g) == [[1, 2], [0]]


def test_invoke_phases_see_through_values_computed_between_invokes():
    """Invoke 2 edits with ``n4 = n0 - n1`` computed between invokes (invoke -1) from the
    other two: it depends on both of them, whichever node it names."""
    g = ir.load({"invokes": [{"prompts": [[1]]}, {"prompts": [[2]]}, {"prompts": [[3]]}],
                 "nodes": [_read(0, invoke=0), _read(1, invoke=1),
                           {"id": 2, "op": "sub", "invoke": -1,
                            "args": [{"ref": 0}, {"ref": 1}]},
                           {"id": 3, "op": "mul", "invoke": -1, "args": [{"ref": 2}, 2.0]},
                           _read(4, invoke=2),
                           {"id": 5, "op": "add", "invoke": 2, "args": [{"ref": 4}, {"ref": 3}]}]})
    assert cross_refs(g) == {2: {0, 1}}
    assert invoke_phases(g) == [[0, 1], [2]]


def test_steering_node_runs_kernel():
    g = ir.load({"invokes": [{"prompts": [[1, 2]]}], "nodes": [
        _read(0),
        {"id": 1, "op": "scale", "args": [{"ref": 0}], "kwargs": {"factor": 3.0,
                                                                   "positions": -1}},
        {"id": 2, "op": "save", "args": [{"ref": 0}]},
    ]})
    x = torch.ones(1, 2, 3)
    runner = GraphRunner(g)
    runner.begin_step(0)
    runner.on_event(FakeEvent("m", "output", {0: x}))
    runner.end_step()
    assert runner.results()[2].tolist() == [[[1.0] * 3, [3.0] * 3]]


def _run_on(nodes, value, tensors=()):
    """Run ``nodes`` (after a read, node 0) on ``value``; the results by save id."""
    g = ir.load({"invokes": [{"prompts": [[1, 2]]}], "nodes": [_read(0), *nodes],
                 "tensors": [ir.encode_tensor(t) for t in tensors]})
    runner = GraphRunner(g)
    runner.begin_step(0)
    runner.on_event(FakeEvent("m", "output", {0: value}))
    runner.end_step()
    return runner.results()


_LIMIT = 64 * 2**20
_H = torch.ones(1, 6, 64)   # a layer's value: 384 elements
_ABOVE = _LIMIT // 384 + 1  # a factor that makes 384 elements more than the limit
_GROWING = {
    "method repeat": [{"id": 1, "op": "method", "args": [{"ref": 0}, 1, 1, _ABOVE],
                "kwargs": {"name": "repeat"}}],
    "method contiguous": [   # of an expanded view (the view alone allocates nothing)
        {"id": 1, "op": "method", "args": [{"ref": 0}, _ABOVE, -1, -1],
         "kwargs": {"name": "expand"}},
        {"id": 2, "op": "method", "args": [{"ref": 1}], "kwargs": {"name": "contiguous"}}],
    "torch.outer": [
        {"id": 1, "op": "method", "args": [{"ref": 0}], "kwargs": {"name": "flatten"}},
        {"id": 2, "op": "call", "args": [{"ref": 1}, {"tensor": 0}],
         "kwargs": {"fn": "torch.outer"}}],
    "torch.nn.functional.pad": [
        {"id": 1, "op": "call", "args": [{"ref": 0}, {"list": [0, _ABOVE * 64]}],
         "kwargs": {"fn": "torch.nn.functional.pad"}}],
    "torch.nn.functional.one_hot": [
        {"id": 1, "op": "method", "args": [{"ref": 0}, {"dtype": "int64"}],
         "kwargs": {"name": "to"}},
        {"id": 2, "op": "call", "args": [{"ref": 1}, _ABOVE],
         "kwargs": {"fn": "torch.nn.functional.one_hot"}}],
    "mul": [   # a broadcast: [384, 1] * [1, n]
        {"id": 1, "op": "method", "args": [{"ref": 0}, -1, 1], "kwargs": {"name": "reshape"}},
        {"id": 2, "op": "mul", "args": [{"ref": 1}, {"tensor": 1}]}],
    "matmul": [
        {"id": 1, "op": "method", "args": [{"ref": 0}, -1, 1], "kwargs": {"name": "reshape"}},
        {"id": 2, "op": "matmul", "args": [{"ref": 1}, {"tensor": 1}]}],
    "indexing": [{"id": 1, "op": "getitem", "args": [{"ref": 0}, {"tensor": 2}]}],
}


@pytest.mark.parametrize("what", list(_GROWING))
def test_ops_that_allocate_from_their_arguments_are_bounded(what):
    """Ops whose result can outgrow their arguments (auditB: a graph's ``h.repeat(1, 1, n)``
    allocated any size inside the vLLM worker) are refused before they allocate, with the
    op and the size; constructors had this limit already."""
    tensors = [torch.ones(_ABOVE), torch.ones(1, _ABOVE),
               torch.zeros(_ABOVE, dtype=torch.long)]
    with pytest.raises(InterventionError, match=rf"\]: ValueError: {re.escape(what)} would "
                       rf"make a tensor of \d+ elements; the limit is {_LIMIT}"):
        _run_on(_GROWING[what], _H.clone(), tensors)


def test_bounded_ops_below_the_limit_and_on_large_model_values_run():
    """The same ops within the limit give torch's values; a model value larger than the limit
    (long logits) may still be computed with at its own size."""
    out = _run_on([{"id": 1, "op": "method", "args": [{"ref": 0}, 1, 1, 3],
                    "kwargs": {"name": "repeat"}},
                   {"id": 2, "op": "save", "args": [{"ref": 1}]},
                   {"id": 3, "op": "method", "args": [{"ref": 0}, 4, -1, -1],
                    "kwargs": {"name": "expand"}},
                   {"id": 4, "op": "method", "args": [{"ref": 3}],
                    "kwargs": {"name": "contiguous"}},
                   {"id": 5, "op": "save", "args": [{"ref": 4}]}], _H * 2)
    assert torch.equal(out[2], (_H * 2).repeat(1, 1, 3))
    assert torch.equal(out[5], (_H * 2).expand(4, -1, -1))
    big = torch.zeros(_LIMIT + 10, dtype=torch.uint8)
    out = _run_on([{"id": 1, "op": "add", "args": [{"ref": 0}, 1]},
                   {"id": 2, "op": "method", "args": [{"ref": 1}], "kwargs": {"name": "sum"}},
                   {"id": 3, "op": "save", "args": [{"ref": 2}]}], big)
    assert int(out[3]) == _LIMIT + 10

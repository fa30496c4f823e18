"""GraphRunner, backend-neutral: fed fake point events, checked against hand torch math."""

from __future__ import annotations

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

"""The capture transport (plugins/vinterp_vllm/wire.py): values come back exactly."""

from __future__ import annotations

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from vinterp_vllm.payload import Outcome, outcomes_from_wire, outcomes_to_wire
from vinterp_vllm.wire import pack, unpack


def test_every_dtype_and_shape_round_trips_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    values = {
        "f32": torch.randn(3, 5, generator=g),
        "bf16": torch.randn(2, 7, generator=g).to(torch.bfloat16),
        "f16": torch.randn(4, generator=g).to(torch.float16),
        "i64": torch.arange(-3, 9),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4),
        # a view with odd strides on size-1 dims, as x[:, -1, 3] gives
        "view": torch.arange(60.0).view(1, 6, 10)[:, -1, 3:4],
    }
    back = unpack(pack(values))
    assert set(back) == set(values)
    for k, v in values.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        assert torch.equal(back[k], v), k


def test_structure_is_kept_and_tensors_are_independent_copies():
    a = torch.ones(2)
    data = {1: [a, (a, "text", None, 3.5)], 2: {"nested": [torch.zeros(1)]}}
    back = unpack(pack(data))
    assert isinstance(back[1], list) and isinstance(back[1][1], tuple)
    assert back[1][1][1:] == ("text", None, 3.5)
    back[1][0].add_(1)                      # no storage shared with the other copy
    assert back[1][1][0].tolist() == [1.0, 1.0]
    assert back[2]["nested"][0].tolist() == [0.0]


def test_each_tensor_owns_its_storage():
    # a view into one shared buffer would make torch.save(one capture) write every capture
    values = [torch.full((1, 576), float(k)) for k in range(50)]
    for k, t in enumerate(unpack(pack(values))):
        assert t.untyped_storage().nbytes() == 576 * 4
        assert t.tolist() == [[float(k)] * 576]


def test_objects_it_does_not_open_are_pickled_whole():
    out = CausalLMOutputWithPast(logits=torch.full((1, 2, 3), 7.0))
    back = unpack(pack({"o": out}))["o"]
    assert isinstance(back, CausalLMOutputWithPast)
    assert torch.equal(back.logits, out.logits)


def test_outcomes_round_trip_with_errors():
    outs = {"k1": Outcome(saves={3: torch.ones(1, 4)}, exports={5: torch.zeros(2)}),
            "k2": Outcome(error="boom", retry_alone=True)}
    back = outcomes_from_wire(outcomes_to_wire(outs))
    assert torch.equal(back["k1"].saves[3], torch.ones(1, 4))
    assert torch.equal(back["k1"].exports[5], torch.zeros(2))
    assert back["k2"].error == "boom" and back["k2"].retry_alone and not back["k2"].saves


def test_in_process_outcomes_equal_the_wire_path_and_own_their_storage():
    from vinterp_vllm.payload import own_copies

    base = torch.arange(12.0).view(4, 3)           # the worker's gathered rows
    outs = {"k": Outcome(saves={1: base[2:3], 2: [(base[0], None)]}, exports={3: base[1]})}
    wired = outcomes_from_wire(outcomes_to_wire(outs))["k"]
    direct = own_copies(outs)["k"]
    assert torch.equal(direct.saves[1], wired.saves[1])
    assert torch.equal(direct.saves[2][0][0], wired.saves[2][0][0])
    assert direct.saves[2][0][1] is None and torch.equal(direct.exports[3], base[1])
    for t in (direct.saves[1], direct.saves[2][0][0], direct.exports[3]):
        assert t.untyped_storage().nbytes() == 3 * 4   # not a view of all gathered rows
    base.zero_()                                   # the worker reuses its buffer
    assert direct.saves[1].tolist() == [[6.0, 7.0, 8.0]]

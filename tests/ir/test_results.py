"""A run's results on the wire keep what a local run returns: tensors, lists per step,
tuples, numbers, dtypes and devices; anything else is refused naming its save."""

from __future__ import annotations

import pytest
import torch

from vinterp.ir.results import decode_results, encode_results


def test_saves_round_trip_with_their_structure():
    saves = {1: torch.arange(6.0).view(2, 3), 2: [torch.ones(1), (torch.zeros(2), 3)],
             3: torch.bfloat16, 4: torch.device("cpu"), 5: torch.Size([2, 3])}
    got, generated = decode_results(encode_results(saves, [torch.tensor([4, 5])]))
    assert torch.equal(got[1], saves[1]) and got[1].dtype == torch.float32
    assert torch.equal(got[2][0], torch.ones(1)) and got[2][1][1] == 3
    assert (got[3], got[4], got[5]) == (torch.bfloat16, torch.device("cpu"), (2, 3))
    assert generated[0].tolist() == [4, 5]


def test_a_save_the_wire_cannot_carry_is_refused_naming_its_node():
    with pytest.raises(ValueError, match="the save of node 7: cannot send a saved object"):
        encode_results({7: object()}, None)

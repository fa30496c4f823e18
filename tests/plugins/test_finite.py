"""The inf/NaN guard of the vectorized path (``finite.finite_rows``), without an engine.

On the CPU a finite total short-cuts the per-row checks; these cases pin that the shortcut
never hides a bad row and that its fallback is the per-row rule: rows an edit made
non-finite keep their old values and are flagged, rows already non-finite are not blamed,
and a total that overflows while every row is finite flags nothing.
"""

from __future__ import annotations

import torch
from vinterp_vllm.finite import finite_rows


def test_all_finite_returns_the_edit_and_no_flags() -> None:
    x = torch.randn(6, 8)
    new = x + 1.0
    out, bad = finite_rows(x, new)
    assert out is new and bad is None


def test_an_overflowing_row_keeps_its_values_and_is_flagged() -> None:
    x = torch.randn(6, 8)
    v = torch.zeros(6, 8)
    v[2, 3] = 3e38
    x[2, 3] = 3e38              # finite on both sides; the edit overflows to inf
    new = x + v
    out, bad = finite_rows(x, new)
    assert bad is not None and bad.tolist() == [False, False, True, False, False, False]
    assert torch.equal(out[2], x[2])
    keep = torch.tensor([0, 1, 3, 4, 5])
    assert torch.equal(out[keep], new[keep])


def test_rows_already_not_finite_are_not_blamed() -> None:
    x = torch.randn(4, 8)
    x[1] = float("nan")         # the model's own NaN, before any edit
    new = x + 1.0
    out, bad = finite_rows(x, new)
    assert bad is not None and not bool(bad.any())
    assert out is new


def test_a_total_that_overflows_with_every_row_finite_flags_nothing() -> None:
    x = torch.zeros(4, 8)
    new = torch.full((4, 8), 3e37)   # each row sums to 2.4e38, the total to inf
    assert torch.isinf(new.sum())
    out, bad = finite_rows(x, new)
    assert bad is not None and not bool(bad.any())
    assert torch.equal(out, new)

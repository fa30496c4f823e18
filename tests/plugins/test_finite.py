"""The inf/NaN guards (``finite.py``), without an engine: the vectorized path's
``finite_rows``, and ``OutputWatch``, which fails a writing request whose output went
non-finite and clears the KV cache once that request stops running.

On the CPU a finite total short-cuts the per-row checks; these cases pin that the shortcut
never hides a bad row and that its fallback is the per-row rule: rows an edit made
non-finite keep their old values and are flagged, rows already non-finite are not blamed,
and a total that overflows while every row is finite flags nothing.
"""

from __future__ import annotations

import torch
from vinterp_vllm.finite import OutputWatch, finite_rows
from vinterp_vllm.layout import RowSpan


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


class _State:
    def __init__(self) -> None:
        self.error: str | None = None

    def fail(self, message: str) -> None:
        self.error = self.error or message


def _span(req_id: str, start: int, stop: int) -> RowSpan:
    return RowSpan(req_index=0, req_id=req_id, start=start, stop=stop, first_pos=0,
                   prompt_len=stop - start)


def test_a_non_finite_output_fails_its_request_only() -> None:
    watch = OutputWatch()
    a, b = _State(), _State()
    out = torch.randn(5, 4)
    out[3, 1] = float("nan")                 # b's second row; row 4 belongs to no writer
    out[4] = float("inf")
    watch.watch(out, [(a, _span("a", 0, 2)), (b, _span("b", 2, 4))],
                lambda rows: torch.tensor(rows))
    watch.resolve(torch.float32)
    assert a.error is None and "became inf or NaN" in (b.error or "")
    assert watch.poisoned == {"b": True}


def test_the_kv_cache_is_cleared_once_the_poisoned_request_stops_running() -> None:
    watch = OutputWatch()
    watch.poisoned = {"b": True}
    kv = torch.randn(2, 3, 4)
    kept = kv.clone()
    kv[1, 2, 0], kv[0, 0, 3] = float("nan"), float("-inf")
    kept[1, 2, 0] = kept[0, 0, 3] = 0.0
    alive = {"b"}
    watch.clear_if_gone({"a", "b"}, alive.__contains__, [kv])    # b still runs: not yet
    assert watch.cleared == 0 and bool(kv.isnan().any())
    watch.clear_if_gone({"a"}, alive.__contains__, [kv])         # preempted: its blocks go
    assert watch.cleared == 1 and torch.equal(kv, kept)           # finite values untouched
    watch.clear_if_gone({"a"}, alive.__contains__, [kv])         # nothing new written
    assert watch.cleared == 1 and watch.poisoned == {"b": False}
    watch.clear_if_gone({"b"}, alive.__contains__, [kv])         # runs again, then ends
    alive.clear()
    watch.clear_if_gone(set(), alive.__contains__, [kv])
    assert watch.cleared == 2 and watch.poisoned == {}


class _Event:
    """A GPU copy's event, still running until synchronized."""

    def __init__(self) -> None:
        self.done = False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.done = True


def test_flags_still_on_their_way_are_waited_for_only_when_their_request_leaves() -> None:
    """On a GPU the flags reach the host after the forward; the next step reads them without
    waiting unless a request they cover is leaving the batch (its blocks may go to others)."""
    watch = OutputWatch()
    st, event = _State(), _Event()
    watch._pending.append((torch.tensor([True, False]), event, [(st, "b", 2)]))
    watch.resolve(torch.float32, scheduled={"a", "b"})       # b still runs: no wait
    assert not event.done and st.error is None and watch._pending
    watch.resolve(torch.float32, scheduled={"a"})            # b left: wait, then fail it
    assert event.done and "became inf or NaN" in (st.error or "")
    assert watch.poisoned == {"b": True} and not watch._pending

"""The vectorized path's per-step grouping (``groups.build_groups``), without an engine.

Points whose requests have the same action layouts (steering every layer with a distinct
vector per request) share one grouping per step; each still gets its own vectors. These tests
pin that sharing never changes a point's groups: rows, table indices, owners and vectors equal
a grouping worked out for that point alone, and a request that fails at one point is not
grouped at the later points of the step.
"""

from __future__ import annotations

import torch
from vinterp_vllm.actions import Action, ActionList
from vinterp_vllm.groups import TensorCache, build_groups
from vinterp_vllm.layout import RowSpan

from vinterp.ir.schema import Node

H = 8


class _State:
    def __init__(self) -> None:
        self.failed = False
        self.mask_cache: dict = {}
        self.error = ""

    def fail(self, msg: str) -> None:
        self.failed, self.error = True, msg


def _steer(seed: int, positions=None) -> Action:
    a = Action("steer", Node(id=seed, op="steer"), 0, float("inf"), positions=positions)
    a.vector = torch.randn(H, generator=torch.Generator().manual_seed(seed))
    a.spec_key = repr(positions)
    return a


def _entries(states, spans, seed: int, positions=None):
    return [(st, sp, ActionList([_steer(seed + i, positions)]))
            for i, (st, sp) in enumerate(zip(states, spans, strict=True))]


def _key(entries):
    """The key the worker builds: each entry's index in the step and its layout id."""
    return tuple((i, actions.layout_id) for i, (_, _, actions) in enumerate(entries))


def _build(entries, cache):
    return build_groups(entries, torch.device("cpu"), cache, _key(entries))


def _summary(groups):
    return [(g.op, g.rows.tolist(), g.table_index.tolist(), [id(o) for o in g.owners],
             g.table.tolist(), g.span, g.identity) for g in groups]


def test_points_with_equal_layouts_share_the_grouping_and_keep_their_vectors() -> None:
    states = [_State() for _ in range(3)]
    spans = [RowSpan(i, f"r{i}", i, i + 1, 7 + i, 5) for i in range(3)]   # decode rows
    points = [_entries(states, spans, 10 * p) for p in range(4)]
    cache = TensorCache()
    shared = [_build(e, cache) for e in points]
    alone = [build_groups(e, torch.device("cpu"), TensorCache()) for e in points]
    assert [_summary(g) for g in shared] == [_summary(g) for g in alone]
    assert len(cache.layouts) == 1                       # worked out once for four points
    assert shared[0][0].rows is shared[3][0].rows         # the same index tensors
    assert shared[0][0].table.tolist() != shared[1][0].table.tolist()
    cache.next_step()
    assert cache.layouts == {}


def test_different_positions_group_apart() -> None:
    states = [_State() for _ in range(2)]
    spans = [RowSpan(0, "a", 0, 4, 0, 4), RowSpan(1, "b", 4, 7, 0, 3)]   # prompt rows
    cache = TensorCache()
    every = _build(_entries(states, spans, 1), cache)
    last = _build(_entries(states, spans, 5, positions=-1), cache)
    assert every[0].rows.tolist() == list(range(7))
    assert last[0].rows.tolist() == [3, 6]
    assert len(cache.layouts) == 2


def test_a_request_failing_at_one_point_is_left_out_of_the_later_ones() -> None:
    states = [_State() for _ in range(2)]
    spans = [RowSpan(0, "a", 0, 4, 0, 4), RowSpan(1, "b", 4, 7, 0, 3)]
    cache = TensorCache()
    good = _build(_entries(states, spans, 1), cache)
    bad = _entries(states, spans, 3)
    bad[1] = (states[1], spans[1], ActionList([_steer(9, positions=[5])]))  # past its prompt
    bad[1][2][0].positions = "not a position"
    bad[1][2][0].spec_key = "bad"
    _build(bad, cache)
    assert states[1].failed and not states[0].failed
    later = _build(_entries(states, spans, 20), cache)
    assert len(good[0].owners) == 2
    assert [id(o) for o in later[0].owners] == [id(states[0])]
    assert later[0].rows.tolist() == [0, 1, 2, 3]


def test_scale_in_bfloat16_rounds_as_the_library_does() -> None:
    """A scale group multiplies in float32 and rounds once, as the library's kernel's
    ``rows * factor`` does: rounding the factor to bfloat16 first (0.3 -> 0.30078) moved
    about half the values of a bfloat16 model by one unit in the last place."""
    from vinterp.steering.kernels import apply_steering

    x = torch.randn(1, 4, H, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    states = [_State()]
    spans = [RowSpan(0, "r0", 0, 4, 0, 4)]
    a = Action("scale", Node(id=1, op="scale"), 0, float("inf"), factor=0.3)
    a.spec_key = repr(None)
    (group,) = _build([(states[0], spans[0], ActionList([a]))], TensorCache())
    got = group.apply(x[0])
    want = x.clone()
    apply_steering("scale", want, torch.arange(4).unsqueeze(0), 4, factor=0.3)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want[0])

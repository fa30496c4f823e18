"""What a graph run accumulates (values, saves) and how its saved values come back.

A :class:`RunState` outlives one forward: the HF backend reruns invokes by phases with the
same state, and the vLLM plugin keeps one per request across its steps.

Example::

    state = RunState()
    GraphRunner(graph, state=state)...   # one or more forwards
    saves = collect_results(graph, state)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from vinterp.ir.schema import Graph


@dataclass
class Saved:
    """One run of a ``save`` node: its value as at the user's line (``snapshot``) and the
    tensor itself (``live``: returned instead when the user asked for its gradient)."""

    snapshot: Any
    live: Any
    #: the step (forward) it was saved at: a request that finished early (a stop string)
    #: may have run one more forward, whose saves are dropped (``results(before_step=)``)
    step: int = 0


@dataclass
class RunState:
    """Everything a run accumulates; survives phase reruns for finished invokes."""

    env: dict[int, Any] = field(default_factory=dict)
    env_step: dict[int, int] = field(default_factory=dict)
    saves: dict[int, list[Saved]] = field(default_factory=dict)
    #: per read node: () -> (row positions, prompt lengths) of its value (``None``: the
    #: inputs are not tokens, see ``PointEvent.row_positions``)
    positions: dict[int, Callable[[], tuple[torch.Tensor, torch.Tensor] | None]] = field(
        default_factory=dict)


def snapshot(value: Any) -> Any:
    """A copy of ``value`` unaffected by later in-place edits (tensors cloned, nesting kept)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # named tuple (topk, max, ...)
        return type(value)(*(snapshot(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(snapshot(v) for v in value)
    if isinstance(value, dict):
        out = {k: snapshot(v) for k, v in value.items()}
        try:
            return type(value)(**out)  # HF ModelOutput and plain dicts
        except TypeError:
            return out
    return value


def collect_results(graph: Graph, state: RunState,
                    before_step: int | None = None) -> dict[int, Any]:
    """Saved values of a finished run (all phases) by save-node id; with ``before_step``,
    only those saved at earlier steps (vLLM can run one forward past a request's end)."""
    out: dict[int, Any] = {}
    for node in graph.nodes:
        if node.op != "save" or node.id not in state.saves:
            continue
        values = [_final(s) for s in state.saves[node.id]
                  if before_step is None or s.step < before_step]
        multi = node.steps.stop is None or node.steps.stop - node.steps.start > 1
        if multi or values:
            out[node.id] = values if multi else values[-1]
    return out


def _final(saved: Saved) -> Any:
    # A saved tensor whose gradient the user asked for is returned live, so .grad is there.
    live = saved.live
    if isinstance(live, torch.Tensor) and (
            live.retains_grad or (live.is_leaf and live.requires_grad)):
        return live
    return saved.snapshot

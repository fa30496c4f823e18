"""Which invokes use which others' values, and the order of forwards (phases) that serves
them: an invoke whose edit needs a value another invoke computes later in the same forward
runs in a later phase."""

from __future__ import annotations

from vinterp.ir.errors import InterventionError
from vinterp.ir.index import graph_index
from vinterp.ir.schema import Graph


def cross_refs(graph: Graph) -> dict[int, set[int]]:
    """invoke → ids of other invokes' nodes it uses, directly or through values computed
    between invokes (``diff = a - b`` written outside any invoke, then used in a third)."""
    index = graph_index(graph)
    owner = index.owner
    # what each node between invokes needs of the invokes, through other such nodes
    via: dict[int, set[int]] = {}
    for n, refs in zip(graph.nodes, index.refs, strict=True):
        if n.invoke < 0:
            via[n.id] = set().union(*(via.get(r, set()) if owner[r] < 0 else {r}
                                      for r in refs))
    out: dict[int, set[int]] = {}
    for n, refs in zip(graph.nodes, index.refs, strict=True):
        if n.invoke < 0:
            continue
        for r in refs:
            used = via.get(r, set()) if owner[r] < 0 else {r}
            for u in used:
                if owner[u] != n.invoke:
                    out.setdefault(n.invoke, set()).add(u)
    return out


def invoke_phases(graph: Graph, needs: dict[int, set[int]] | None = None) -> list[list[int]]:
    """Group invokes so each depends only on invokes in earlier groups.

    ``needs``: :func:`cross_refs` of ``graph`` when the caller has it already.
    """
    owner = graph_index(graph).owner
    deps: dict[int, set[int]] = {i: set() for i in range(max(1, len(graph.invokes)))}
    for i, refs in (cross_refs(graph) if needs is None else needs).items():
        deps[i] = {owner[r] for r in refs}
    phase: dict[int, int] = {}

    def depth(i: int, stack: tuple[int, ...] = ()) -> int:
        if i in phase:
            return phase[i]
        if i in stack:
            raise InterventionError(f"invokes {list(stack)} depend on each other in a cycle")
        phase[i] = max((depth(d, stack + (i,)) + 1 for d in deps[i]), default=0)
        return phase[i]

    for i in deps:
        depth(i)
    groups: list[list[int]] = [[] for _ in range(max(phase.values(), default=0) + 1)]
    for i in sorted(phase):
        groups[phase[i]].append(i)
    return groups

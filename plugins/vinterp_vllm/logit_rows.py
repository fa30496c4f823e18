"""Which sequence positions of a logits point a request's graph can observe.

vLLM computes logits only where it samples; vinterp computes them on demand from the final
norm's rows when a graph reads ``model.logits`` / ``model.lm_head.output`` /
``model.output.logits``. In a trace that is every prompt position, a ``[positions, vocab]``
matrix product, while nnsight code almost always reads one position:
``model.output.logits[:, -1].softmax(-1)``. In a patching sweep of 10-token prompts, one
call per request was about a third of each forward on the CPU, mostly reading the LM head's
weights once per request.

:func:`read_positions` proves from the graph which positions can be observed: every use of the
value is a ``getitem`` whose key picks an integer position at the sequence dimension
(``[:, -1]``, ``[0, -1]``, ``[:, 3, :]``; for ``model.output`` through ``.logits``).
:func:`batched_logits` then computes only those rows, for every request reading logits at the
step in one call (the LM head's weights read once), and fills the other rows with NaN, so a
wrong proof could never pass for a value.

Example::

    >>> from vinterp.ir import Graph, Node, Ref, TupleV, SliceV
    >>> g = Graph(nodes=(
    ...     Node(id=0, op="read", kwargs={"module": "lm_head", "kind": "output"}),
    ...     Node(id=1, op="getitem", args=(Ref(ref=0), TupleV(tuple=(SliceV(slice=(None,
    ...          None, None)), -1)))),
    ...     Node(id=2, op="save", args=(Ref(ref=1),))))
    >>> sorted(read_positions(g, 0, ("lm_head", "output"), "logits"))
    [-1]
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from vinterp.ir.schema import Graph, Node, Ref, SliceV, TupleV
from vinterp.ir.validate import node_refs
from vinterp_vllm.layout import RowSpan


def _full_slice(v: Any) -> bool:
    return isinstance(v, SliceV) and tuple(v.slice) == (None, None, None)


def _picked_position(node: Node, src: int) -> int | None:
    """The sequence position ``node`` picks from ``src`` (``src[b, pos, ...]``), else None."""
    if node.op != "getitem" or len(node.args) != 2 or node.args[0] != Ref(ref=src):
        return None
    key = node.args[1]
    if not isinstance(key, TupleV) or len(key.tuple) < 2:
        return None
    batch, pos = key.tuple[0], key.tuple[1]
    batch_ok = _full_slice(batch) or (isinstance(batch, int) and not isinstance(batch, bool))
    if not batch_ok or not isinstance(pos, int) or isinstance(pos, bool):
        return None
    if src in node_refs(node)[1:]:   # the value also used inside the key
        return None
    return pos


def read_positions(graph: Graph, invoke: int, key: tuple[str, str],
                   value: str) -> frozenset[int] | None:
    """The positions (negative: from the end) of point ``key``'s logits that ``invoke``'s part
    of ``graph`` can observe, or ``None`` when it may observe any (``value``: the point's
    value kind, ``logits`` or ``model_output``)."""
    users: dict[int, list[Node]] = defaultdict(list)
    reads = []
    for n in graph.nodes:
        for r in set(node_refs(n)):
            users[r].append(n)
        if n.op in ("read", "write") and (n.kwargs.get("module"), n.kwargs.get("kind")) == key:
            if n.op == "write" or n.invoke not in (invoke, -1):
                return None
            reads.append(n.id)
    tensors = list(reads)
    if value == "model_output":
        tensors = []
        for r in reads:
            for u in users[r]:
                if u.op != "getattr" or u.kwargs.get("name") != "logits" \
                        or node_refs(u) != [r]:
                    return None
                tensors.append(u.id)
    positions: set[int] = set()
    for t in tensors:
        for u in users[t]:
            pos = _picked_position(u, t)
            if pos is None:
                return None
            positions.add(pos)
    return frozenset(positions)


def wanted_rows(span: RowSpan, trace: bool, positions: frozenset[int] | None) -> list[int]:
    """Which of ``span``'s rows need logits: in a trace those at ``positions`` (all when
    ``None``), at a generation step the sampled (last) row."""
    n = span.stop - span.start
    if not trace:
        return [n - 1]
    if positions is None:
        return list(range(n))
    want = {p if p >= 0 else span.prompt_len + p for p in positions}
    return [i for i in range(n) if span.first_pos + i in want]


def batched_logits(model: Any, normed: torch.Tensor,
                   wants: list[tuple[RowSpan, list[int], bool]]) -> list[torch.Tensor]:
    """Logits for several requests' rows of ``normed`` (the final norm's ``[tokens, hidden]``)
    in one ``compute_logits`` call: the LM head's weights are read once, not once per request
    (on the CPU a call costs about as much for 1 row as for 10).

    ``wants``: per request ``(span, rows, trace)``, ``rows`` from :func:`wanted_rows`. A trace
    gets all of its span's rows, those not wanted NaN; a generation step its one row.
    """
    idx = [span.start + i for span, rows, _ in wants for i in rows]
    some = model.compute_logits(normed[idx] if idx else normed[:1])
    out, at = [], 0
    for span, rows, trace in wants:
        got = some[at:at + len(rows)]
        at += len(rows)
        if not trace:
            out.append(got)
            continue
        full = torch.full((span.stop - span.start, some.shape[-1]), float("nan"),
                          dtype=some.dtype, device=some.device)
        full[rows] = got
        out.append(full)
    return out

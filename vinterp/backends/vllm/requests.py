"""Splitting a graph into per-request payloads (one vLLM request per prompt).

Each request carries only its own invoke's nodes (plus what they reference) and the tensor
constants those use, so 64 invokes with 64 vectors do not ship 64² vectors. Writing requests
get a ``cache_salt`` from their intervention's fingerprint (never reuse KV computed under other
interventions); requests that read prompt positions skip reading the prefix cache.

Example::

    subgraph_json(graph, invoke=1)   # IR JSON of invoke 1's nodes only
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from vinterp.ir import ops
from vinterp.ir.schema import Graph, Node
from vinterp.ir.validate import iter_refs, node_values


def _remap_tensors(obj: Any, remap: dict[int, int]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"tensor"} and isinstance(obj["tensor"], int):
            return {"tensor": remap[obj["tensor"]]}
        return {k: _remap_tensors(v, remap) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_remap_tensors(v, remap) for v in obj]
    return obj


def _tensor_ids(obj: Any, out: set[int]) -> None:
    if isinstance(obj, dict):
        if set(obj) == {"tensor"} and isinstance(obj["tensor"], int):
            out.add(obj["tensor"])
        for v in obj.values():
            _tensor_ids(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _tensor_ids(v, out)


def subgraph_json(graph: Graph, invoke: int) -> str:
    """IR JSON with only ``invoke``'s nodes and what they reference.

    Nodes outside any invoke that combine several invokes' values run on the client after
    the requests (see :func:`global_refs`); they are not sent.
    """
    by_id = {n.id: n for n in graph.nodes}
    keep: set[int] = set()
    stack = [n.id for n in graph.nodes if n.invoke == invoke]
    while stack:
        nid = stack.pop()
        if nid in keep:
            continue
        keep.add(nid)
        stack.extend(r for v in node_values(by_id[nid]) for r in iter_refs(v))
    nodes = [n.model_dump(mode="json") for n in graph.nodes if n.id in keep]
    used: set[int] = set()
    _tensor_ids(nodes, used)
    remap = {old: new for new, old in enumerate(sorted(used))}
    data = graph.model_dump(mode="json")
    data["nodes"] = _remap_tensors(nodes, remap)
    data["tensors"] = [data["tensors"][old] for old in sorted(used)]
    data["invokes"] = [inv if i == invoke else {"prompts": []}
                       for i, inv in enumerate(data["invokes"])]
    return json.dumps(data, separators=(",", ":"))


def _mine(graph: Graph, invoke: int) -> list[Node]:
    return [n for n in graph.nodes if n.invoke in (invoke, -1)]


def writes(graph: Graph, invoke: int) -> bool:
    """True if ``invoke``'s nodes may change activations (then the KV cache is theirs alone)."""
    for n in _mine(graph, invoke):
        if n.op in ops.STEERING_OPS or n.op in ops.INPLACE_OPS or n.op in ("write", "setitem"):
            return True
        if n.op == "method" and str(n.kwargs.get("name", "")).endswith("_"):
            return True
    return False


def reads_prompt(graph: Graph, invoke: int) -> bool:
    """True if ``invoke`` reads any point during the prompt's forward (step 0)."""
    return any(n.op == "read" and n.steps.start == 0 for n in _mine(graph, invoke))


def fingerprint(graph_json: str) -> str:
    """A short stable hash of a request's intervention (its cache salt)."""
    return hashlib.sha256(graph_json.encode()).hexdigest()[:32]


def global_refs(graph: Graph) -> set[int]:
    """Ids of invokes' nodes that nodes outside any invoke use (requests must export them)."""
    owner = {n.id: n.invoke for n in graph.nodes}
    return {r for n in graph.nodes if n.invoke < 0
            for v in node_values(n) for r in iter_refs(v) if owner[r] >= 0}



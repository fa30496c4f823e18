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
from vinterp.ir.validate import node_refs, node_tensor_refs


def _remap_value(v: Any, tensors: dict[int, int], refs: dict[int, int] | None = None) -> Any:
    """A JSON IR value with its tensor-constant indices (and, given ``refs``, node ids)
    renumbered; walked by the IR's shapes, so a user dict with a key named ``tensor`` or
    ``ref`` is left alone."""
    if not isinstance(v, dict) or len(v) != 1:
        return v
    ((key, inner),) = v.items()
    if key == "tensor":
        return {"tensor": tensors[inner]}
    if key == "ref":
        return v if refs is None else {"ref": refs[inner]}
    if key == "mapping":
        return {"mapping": {k: _remap_value(x, tensors, refs) for k, x in inner.items()}}
    if key in ("list", "tuple", "slice"):
        return {key: [_remap_value(x, tensors, refs) for x in inner]}
    return v


def _remap_node(node: dict[str, Any], tensors: dict[int, int],
                refs: dict[int, int] | None = None) -> dict[str, Any]:
    return {**node, "args": [_remap_value(v, tensors, refs) for v in node["args"]],
            "kwargs": {k: _remap_value(v, tensors, refs) for k, v in node["kwargs"].items()}}


class GraphSplitter:
    """Cuts one graph into per-invoke request graphs; the graph is serialized once.

    (Serializing the whole graph per invoke made a 256-invoke, 7,680-node capture trace spend
    most of its time here: quadratic in the number of invokes.)
    """

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.data = graph.model_dump(mode="json")
        self.by_id = {n.id: n for n in graph.nodes}
        self.node_json = {n.id: d for n, d in zip(graph.nodes, self.data["nodes"], strict=True)}
        self.order = {n.id: k for k, n in enumerate(graph.nodes)}
        self.node_tensors = {n.id: t for n in graph.nodes if (t := node_tensor_refs(n))}
        self.by_invoke: dict[int, list[int]] = {}
        for n in graph.nodes:
            self.by_invoke.setdefault(n.invoke, []).append(n.id)

    def _closure(self, invoke: int) -> list[int]:
        """Ids of ``invoke``'s nodes and every node they use, in program order."""
        keep: set[int] = set()
        stack = list(self.by_invoke.get(invoke, ()))
        while stack:
            nid = stack.pop()
            if nid not in keep:
                keep.add(nid)
                stack.extend(node_refs(self.by_id[nid]))
        return sorted(keep, key=self.order.__getitem__)

    def subgraph_json(self, invoke: int) -> str:
        """IR JSON with only ``invoke``'s nodes and what they reference.

        Nodes outside any invoke that combine several invokes' values run on the client
        after the requests; they are not sent.
        """
        invokes = [inv if i == invoke else {"prompts": []}
                   for i, inv in enumerate(self.data["invokes"])]
        return self._dump(self._closure(invoke), invokes)

    def request_json(self, invoke: int) -> tuple[str, list[int]] | None:
        """A self-contained graph for one invoke with no cross-invoke values: its nodes
        renumbered from 0 and its invoke as invoke 0 (the only one), plus the original id of
        each node (``ids[new] = old``) to map the outcomes back. ``None`` when the invoke uses
        another invoke's nodes (then :meth:`subgraph_json` and imports apply).

        Invokes that do the same thing (a loop over prompts of one length) get the same text,
        so the worker parses and plans it once for all of them (and writing ones share a cache
        salt, which is right: the same intervention makes the same KV).
        """
        ids = self._closure(invoke)
        if any(self.by_id[i].invoke not in (invoke, -1) for i in ids):
            return None
        # The request carries the prompt's tokens; the worker only needs each prompt's length
        # (positions resolve against it), so equal-length prompts share the text too.
        inv = self.data["invokes"][invoke]
        invokes = [{**inv, "prompts": [[0] * len(p) for p in inv["prompts"]]}]
        return self._dump(ids, invokes, renumber=True), ids

    def _dump(self, ids: list[int], invokes: list[Any], renumber: bool = False) -> str:
        """IR JSON of nodes ``ids`` and only the tensor constants they use (renumbered).

        ``renumber``: node ids become 0, 1, ... (references follow) and invoke nodes become
        invoke 0, for a graph that holds that one invoke.
        """
        used = sorted({t for i in ids for t in self.node_tensors.get(i, ())})
        tensors = {old: k for k, old in enumerate(used)}
        if renumber:
            refs = {old: k for k, old in enumerate(ids)}
            nodes = []
            for k, i in enumerate(ids):
                d = _remap_node(self.node_json[i], tensors, refs)
                d["id"] = k
                d["invoke"] = 0 if d["invoke"] >= 0 else -1
                nodes.append(d)
        else:
            nodes = [_remap_node(self.node_json[i], tensors) if i in self.node_tensors
                     else self.node_json[i] for i in ids]
        data = {k: v for k, v in self.data.items() if k not in ("nodes", "tensors", "invokes")}
        data.update(nodes=nodes, tensors=[self.data["tensors"][old] for old in used],
                    invokes=invokes)
        return json.dumps(data, separators=(",", ":"))


def subgraph_json(graph: Graph, invoke: int) -> str:
    """IR JSON with only ``invoke``'s nodes and what they reference (see GraphSplitter)."""
    return GraphSplitter(graph).subgraph_json(invoke)


def nodes_by_invoke(graph: Graph) -> dict[int, list[Node]]:
    """Each invoke's nodes, plus the nodes outside any invoke, in program order."""
    out: dict[int, list[Node]] = {i: [] for i in range(len(graph.invokes))}
    for n in graph.nodes:
        for i in (out if n.invoke < 0 else (n.invoke,)):
            out.setdefault(i, []).append(n)
    return out


def writes(nodes: list[Node]) -> bool:
    """True if an invoke's nodes may change activations (then the KV cache is theirs alone)."""
    for n in nodes:
        if n.op in ops.STEERING_OPS or n.op in ops.INPLACE_OPS or n.op in ("write", "setitem"):
            return True
        if n.op == "method" and str(n.kwargs.get("name", "")).endswith("_"):
            return True
    return False


def reads_prompt(nodes: list[Node]) -> bool:
    """True if an invoke reads any point during the prompt's forward (step 0)."""
    return any(n.op == "read" and n.steps.start == 0 for n in nodes)


def fingerprint(graph_json: str) -> str:
    """A short stable hash of a request's intervention (its cache salt)."""
    return hashlib.sha256(graph_json.encode()).hexdigest()[:32]


def isolate_prefix_cache(nodes: list[Node], graph_json: str, prompt: dict[str, Any],
                         params: Any) -> None:
    """Apply the prefix-cache rules for a request running ``nodes`` (its invoke's): a writer
    gets a ``cache_salt`` from its intervention (never share KV computed under another one);
    a reader of prompt positions skips reading the cache (it needs them computed here).
    The one rule for the offline backend and the server."""
    if writes(nodes):
        prompt["cache_salt"] = fingerprint(graph_json)
    if reads_prompt(nodes):
        params.skip_reading_prefix_cache = True


def global_refs(graph: Graph) -> set[int]:
    """Ids of invokes' nodes that nodes outside any invoke use (requests must export them)."""
    owner = {n.id: n.invoke for n in graph.nodes}
    return {r for n in graph.nodes if n.invoke < 0
            for r in node_refs(n) if owner[r] >= 0}



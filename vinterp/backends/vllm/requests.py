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
from typing import Any

import pydantic_core

from vinterp.ir import ops
from vinterp.ir.index import graph_index
from vinterp.ir.jsonform import node_json
from vinterp.ir.schema import Graph, Node


class GraphSplitter:
    """Cuts one graph into per-invoke request graphs; each node is written once.

    (Serializing the whole graph per invoke made a 256-invoke, 7,680-node capture trace spend
    most of its time here: quadratic in the number of invokes. Each node is now written in
    its request's numbering directly (``jsonform.node_json``), and what each node uses comes
    from the graph's shared index, walked once: splitting that trace takes 0.09 s, down from
    0.30 s.)
    """

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.index = graph_index(graph)
        # (nodes are written per request by node_json, renumbered on the way)
        self.data = graph.model_dump(mode="json", exclude={"nodes"})
        self.head = {k: v for k, v in self.data.items() if k not in ("tensors", "invokes")}
        self.by_invoke: dict[int, list[int]] = {}    # invoke -> positions, in program order
        for k, n in enumerate(graph.nodes):
            self.by_invoke.setdefault(n.invoke, []).append(k)

    def _closure(self, invoke: int) -> list[int]:
        """Positions of ``invoke``'s nodes and every node they use, in program order."""
        own = self.by_invoke.get(invoke, [])
        refs, owner = self.index.refs, self.index.owner
        # the usual invoke uses only its own nodes: no search
        if all(owner[r] == invoke for k in own for r in refs[k]):
            return own
        position = self.index.position
        keep: set[int] = set()
        stack = list(own)
        while stack:
            k = stack.pop()
            if k not in keep:
                keep.add(k)
                stack.extend(position[r] for r in refs[k])
        return sorted(keep)

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
        keep = self._closure(invoke)
        nodes = self.graph.nodes
        if any(nodes[k].invoke not in (invoke, -1) for k in keep):
            return None
        # The request carries the prompt's tokens; the worker only needs each prompt's length
        # (positions resolve against it), so equal-length prompts share the text too.
        inv = self.data["invokes"][invoke]
        invokes = [{**inv, "prompts": [[0] * len(p) for p in inv["prompts"]]}]
        return self._dump(keep, invokes, renumber=True), [nodes[k].id for k in keep]

    def _dump(self, keep: list[int], invokes: list[Any], renumber: bool = False) -> str:
        """IR JSON of the nodes at positions ``keep`` and only the tensor constants they use
        (renumbered).

        ``renumber``: node ids become 0, 1, ... (references follow) and invoke nodes become
        invoke 0, for a graph that holds that one invoke.
        """
        uses, graph_nodes = self.index.tensors, self.graph.nodes
        used = sorted({t for k in keep for t in uses[k]})
        tensors = {old: new for new, old in enumerate(used)}
        if renumber:
            ids = {graph_nodes[k].id: new for new, k in enumerate(keep)}
            nodes = [node_json(graph_nodes[k], id=new, refs=ids, tensors=tensors,
                               invoke=0 if graph_nodes[k].invoke >= 0 else -1)
                     for new, k in enumerate(keep)]
        else:
            nodes = [node_json(graph_nodes[k], tensors=tensors) for k in keep]
        data = {**self.head, "nodes": nodes,
                "tensors": [self.data["tensors"][old] for old in used], "invokes": invokes}
        # pydantic's encoder: the same text as json.dumps(separators=(",", ":")), UTF-8 instead
        # of \u escapes, at a third of the time; inf and nan as the constants Python's json
        # module and the IR's own serializer write
        return pydantic_core.to_json(data, inf_nan_mode="constants").decode()


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


def fingerprint(graph_json: str, imports: dict[str, Any] | None = None) -> str:
    """A short stable hash of a request's intervention (its cache salt): its graph and the
    values it takes from other invokes (a patch from another prompt is part of the edit)."""
    h = hashlib.sha256(graph_json.encode())
    if imports:
        h.update(pydantic_core.to_json(imports, inf_nan_mode="constants"))
    return h.hexdigest()[:32]


def isolate_prefix_cache(nodes: list[Node], graph_json: str, prompt: dict[str, Any],
                         params: Any, imports: dict[str, Any] | None = None) -> None:
    """Apply the prefix-cache rules for a request running ``nodes`` (its invoke's) with
    ``imports`` (other invokes' values): a writer gets a ``cache_salt`` from its
    intervention (never share KV computed under another one); a request that reads or
    edits prompt positions skips reading the cache (they must be computed here, by it: a
    patch of the prompt that read its own cached blocks ran on part of the prompt only).
    The one rule for the offline backend and the server."""
    if ops.writes(nodes):
        prompt["cache_salt"] = fingerprint(graph_json, imports)
    if ops.acts_on_prompt(nodes):
        params.skip_reading_prefix_cache = True


def global_refs(graph: Graph) -> set[int]:
    """Ids of invokes' nodes that nodes outside any invoke use (requests must export them)."""
    index = graph_index(graph)
    owner = index.owner
    return {r for n, refs in zip(graph.nodes, index.refs, strict=True) if n.invoke < 0
            for r in refs if owner[r] >= 0}



"""Loading and validating graphs: the gate every graph passes before it runs.

``load`` rejects unknown ops, dangling or forward references (which also rules out cycles),
malformed tensors, oversize constants and bad point specs, each with a message naming the node.

Example::

    >>> from vinterp.ir import load
    >>> load({"nodes": [{"id": 0, "op": "exec", "kwargs": {}}]})
    Traceback (most recent call last):
    ...
    vinterp.ir.validate.GraphError: node 0: unknown op 'exec' (not in the IR allowlist)
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import ValidationError

from vinterp.ir import ops
from vinterp.ir.index import graph_index, node_uses
from vinterp.ir.schema import Graph, Invoke, ListV, NamedTensor, Node, SessionValue
from vinterp.ir.tensors import nbytes

#: default limits; servers may pass stricter ones.
MAX_TENSOR_BYTES = 256 * 2**20
MAX_TOTAL_TENSOR_BYTES = 1024 * 2**20
MAX_NODES = 200_000
_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")


class GraphError(ValueError):
    """A graph failed validation; the message names the node and what is wrong."""


def node_refs(node: Node) -> list[int]:
    """Ids of the nodes ``node`` uses, in argument order (repeats kept).

    Example::

        >>> from vinterp.ir import Node, Ref
        >>> node_refs(Node(id=2, op="add", args=(Ref(ref=0), Ref(ref=1))))
        [0, 1]
    """
    return node_uses(node)[0]


def node_tensor_refs(node: Node) -> list[int]:
    """Indices of the tensor constants ``node`` uses."""
    return node_uses(node)[1]


def load(
    data: str | bytes | dict[str, Any] | Graph,
    *,
    max_tensor_bytes: int = MAX_TENSOR_BYTES,
    max_total_tensor_bytes: int = MAX_TOTAL_TENSOR_BYTES,
    max_nodes: int = MAX_NODES,
) -> Graph:
    """Parse (JSON text, dict or Graph) and validate an intervention graph.

    Example::

        >>> from vinterp.ir import load
        >>> g = load('{"nodes": [{"id": 0, "op": "read", '
        ...          '"kwargs": {"module": "model.layers.0", "kind": "output"}}]}')
        >>> g.nodes[0].op
        'read'
    """
    if isinstance(data, Graph):
        graph = data
    else:
        try:
            if isinstance(data, (str, bytes)):
                graph = Graph.model_validate_json(data)
            else:
                graph = Graph.model_validate(data)
        except ValidationError as exc:
            raise GraphError(f"malformed intervention graph: {exc}") from None
    validate(graph, max_tensor_bytes=max_tensor_bytes,
             max_total_tensor_bytes=max_total_tensor_bytes, max_nodes=max_nodes)
    return graph


def validate(
    graph: Graph,
    *,
    max_tensor_bytes: int = MAX_TENSOR_BYTES,
    max_total_tensor_bytes: int = MAX_TOTAL_TENSOR_BYTES,
    max_nodes: int = MAX_NODES,
) -> None:
    """Check a parsed graph; raise :class:`GraphError` naming the first bad node."""
    if len(graph.nodes) > max_nodes:
        raise GraphError(f"graph has {len(graph.nodes)} nodes; the limit is {max_nodes}")
    total = 0
    for i, td in enumerate(graph.tensors):
        size = nbytes(td)
        if size > max_tensor_bytes:
            raise GraphError(
                f"tensor constant {i} ({td.dtype}{list(td.shape)}) is {size} bytes; "
                f"the limit is {max_tensor_bytes}"
            )
        total += size
        if isinstance(td, NamedTensor):   # filled in by the server from the caller's vectors
            if not td.named:
                raise GraphError(f"tensor constant {i}: a named tensor needs a name")
            continue
        if isinstance(td, SessionValue):  # filled in by the server from an earlier trace
            continue
        # base64 length must match the shape (4 chars per 3 bytes, padded)
        expected = 4 * ((size + 2) // 3)
        if not _BASE64.fullmatch(td.data):
            raise GraphError(f"tensor constant {i}: data is not valid base64")
        if len(td.data) != expected:
            raise GraphError(
                f"tensor constant {i}: {len(td.data)} base64 characters do not match "
                f"dtype {td.dtype} and shape {list(td.shape)} (expected {expected})"
            )
    if total > max_total_tensor_bytes:
        raise GraphError(
            f"tensor constants total {total} bytes; the limit is {max_total_tensor_bytes}"
        )
    n_invokes = len(graph.invokes)
    n_tensors = len(graph.tensors)
    for i, inv in enumerate(graph.invokes):
        problem = _token_inputs_problem(graph, inv)
        if problem:
            raise GraphError(f"invoke {i}: {problem}")
    index = graph_index(graph)
    seen: set[int] = set()
    for node, refs, tensors in zip(graph.nodes, index.refs, index.tensors, strict=True):
        problem = _node_problem(graph, node, refs, tensors, seen, n_invokes, n_tensors)
        if problem:
            where = f"node {node.id}" + (f" ({node.line})" if node.line else "")
            raise GraphError(f"{where}: {problem}")
        seen.add(node.id)


def _node_problem(graph: Graph, node: Node, refs: tuple[int, ...], tensors: tuple[int, ...],
                  seen: set[int], n_invokes: int, n_tensors: int) -> str | None:
    """What is wrong with ``node`` (which uses nodes ``refs`` and constants ``tensors``)
    given the ids before it, or ``None`` (runs per node: the message is only built when
    something is wrong)."""
    if node.id in seen:
        return "duplicate node id"
    if not ops.known_op(node.op):
        return f"unknown op {node.op!r} (not in the IR allowlist)"
    problem = ops.check_call(node.op, node.kwargs)
    if problem:
        return problem
    if n_invokes and not (-1 <= node.invoke < n_invokes):
        return f"invoke {node.invoke} does not exist (the graph has {n_invokes})"
    if node.steps.stop is not None and node.steps.stop <= node.steps.start:
        return f"empty step range [{node.steps.start}, {node.steps.stop})"
    for ref in refs:
        # Only references to earlier nodes are allowed: this also excludes cycles.
        if ref not in seen:
            kind = "a later node (cycle)" if ref in {n.id for n in graph.nodes} \
                else "a node that does not exist"
            return f"argument refers to node {ref}, {kind}"
    for t in tensors:
        if not 0 <= t < n_tensors:
            return f"tensor constant {t} does not exist"
    if node.op in ops.STEERING_OPS:
        problem = _positions_problem(graph, node)
        if problem:
            return problem
    back = node.kwargs.get("backward") if node.op == "getattr" else None
    if back is not None and not any(n.id == back.ref and n.op == "backward"
                                    for n in graph.nodes):
        return f"'backward' refers to node {back.ref}, which is not a backward"
    return None


def _token_inputs_problem(graph: Graph, inv: Invoke) -> str | None:
    """What is wrong with an invoke's ``token_inputs`` (one entry per token of each prompt)."""
    if not inv.token_inputs:
        return None
    if len(inv.token_inputs) != len(inv.prompts):
        return (f"token_inputs has {len(inv.token_inputs)} entries for {len(inv.prompts)} "
                f"prompts; give one per prompt ({{}} for none)")
    for j, (prompt, given) in enumerate(zip(inv.prompts, inv.token_inputs, strict=True)):
        for name, ref in given.items():
            if not 0 <= ref.tensor < len(graph.tensors):
                return f"token_inputs[{j}].{name} refers to missing tensor {ref.tensor}"
            td = graph.tensors[ref.tensor]
            shape = getattr(td, "shape", None)
            if shape is None or not shape or shape[0] != len(prompt):
                return (f"token_inputs[{j}].{name} has shape {list(shape or ())}; it needs "
                        f"one entry per token of the prompt ({len(prompt)} tokens)")
    return None


def _positions_problem(graph: Graph, node: Node) -> str | None:
    """A steering op whose positions name no token its invoke has: it would select no row
    and silently change nothing (the server refuses such positions too). Negatives count
    back from the prompt's end; a generation's last position that runs through the model is
    the prompt's length plus the new tokens, less one. A list may name positions only some
    of an invoke's prompts have (absolute positions across prompts of several lengths)."""
    positions = node.kwargs.get("positions")
    if isinstance(positions, ListV):
        positions = positions.list
    elif isinstance(positions, int) and not isinstance(positions, bool):
        positions = (positions,)
    else:   # all, "prompt", "generated", a slice, a value of the run: nothing to check
        return None
    if not positions or not all(isinstance(p, int) and not isinstance(p, bool)
                                for p in positions) or not 0 <= node.invoke < len(graph.invokes):
        return None
    invoke = graph.invokes[node.invoke]
    settings = {**graph.generation, **invoke.generation}
    new = 1 if graph.mode == "trace" else next(
        (settings[k] for k in ("max_new_tokens", "max_tokens") if isinstance(settings.get(k), int)),
        None)
    lens = [len(p) for p in invoke.prompts if p]
    if not lens or new is None:
        return None

    def has(n: int, p: int) -> bool:
        return -n <= p < n + new - 1

    if any(has(n, p) for n in lens for p in positions):
        return None
    n = max(lens)
    more = "" if graph.mode == "trace" else f", then {new} new ones"
    return (f"steering positions {list(positions)} name no token of this invoke (its longest "
            f"prompt has {n} tokens{more}: positions 0..{n + new - 2}, or -{n}..-1 from the "
            f"prompt's end), so the {node.op} would change nothing; fix the positions")


def dumps(graph: Graph, *, indent: int | None = None) -> str:
    """Serialize a graph to its versioned JSON encoding."""
    return graph.model_dump_json(indent=indent)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the IR, for clients written in other languages.

    Example::

        >>> from vinterp.ir import json_schema
        >>> json_schema()["title"]
        'Graph'
    """
    return Graph.model_json_schema()


def to_dict(graph: Graph) -> dict[str, Any]:
    """The graph as plain JSON-compatible data."""
    return json.loads(dumps(graph))

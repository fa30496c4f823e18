"""Invokes with several prompts on the vllm backend: what must be refused.

vLLM runs every prompt as its own request, so an invoke of ``k`` prompts
(``model.trace([a, b])``, ``tracer.invoke([a, b])``) runs its graph ``k`` times on batches of
one, and the values are joined along the batch dimension afterwards. Row-wise code (``[:, -1]``,
``+= v``, ``.norm(dim=-1)``, steering) then equals the HF backend's one batch. Code that mixes
the prompts does not: ``h.mean(0)`` would be each prompt's own mean, ``h[:] = h[:1]`` would
copy each prompt onto itself, ``h[1]`` would not exist. :func:`check_prompt_batches` refuses the
common forms of it before anything runs, naming the line and what to write instead (one
invoke per prompt, combined outside the invokes, which the vllm backend runs as in HF).

Not caught: reorderings of the batch (``flip(0)``, ``roll(..., 0)``), reductions over a
negative dim that is the batch's, and reshapes that merge it.

Example::

    with model.trace(["The cat", "A dog"]):          # backend="vllm"
        m = model.model.layers[3].output.mean(0)      # refused: mixes the invoke's prompts
"""

from __future__ import annotations

from typing import Any

from vinterp.ir.schema import EllipsisV, Graph, ListV, Node, Ref, SliceV, TupleV
from vinterp.ir.validate import node_refs

#: tensor methods / torch functions that reduce over every dim unless given one
REDUCTIONS = frozenset({
    "sum", "mean", "norm", "max", "min", "amax", "amin", "std", "var", "prod", "logsumexp",
    "argmax", "argmin", "median", "all", "any", "count_nonzero", "nansum", "nanmean",
})
#: torch functions that join their inputs along dim 0 unless given another
JOINS = frozenset({"cat", "concat", "concatenate", "stack", "vstack", "row_stack"})


def check_prompt_batches(graph: Graph, kinds: dict[tuple[str, str], str]) -> None:
    """Raise ``ValueError`` for code that mixes the prompts of an invoke with several
    (see the module doc). ``kinds``: each read point's value kind (``points.resolve_point``):
    an attention's output is a tuple, whose ``[0]`` picks its hidden states, not a prompt."""
    multi = {i for i, inv in enumerate(graph.invokes) if len(inv.prompts) > 1}
    if not multi:
        return
    batch: set[int] = set()      # tensors with the invoke's prompts along dim 0
    tuples: set[int] = set()     # tuple-valued reads (attention) and the model's output
    for n in graph.nodes:
        if n.invoke not in multi:
            continue
        if n.op == "read":
            kind = kinds.get((n.kwargs["module"], n.kwargs["kind"]))
            (tuples if kind in ("attn", "model_output") else batch).add(n.id)
            continue
        refs = set(node_refs(n))
        if n.op in ("getitem", "getattr") and refs & tuples:
            batch.add(n.id)      # (a tuple's item, the output's logits: batch tensors)
            continue
        if not refs & batch:
            continue
        what = _mixes(n, batch)
        if what is not None:
            where = f" at {n.line}" if n.line else ""
            k = len(graph.invokes[n.invoke].prompts)
            raise ValueError(
                f"{what}{where} mixes the {k} prompts of invoke {n.invoke}: on the vllm "
                f"backend each prompt of an invoke runs as its own request, so it would see "
                f"one prompt at a time. Give each prompt its own tracer.invoke(...) and "
                f"combine their values outside the invokes (e.g. torch.cat(hs).mean(0) after "
                f"the with-invoke blocks), keep to row-wise code ([:, -1], .norm(dim=-1), "
                f"+= v), or use backend='hf'")
        batch.add(n.id)


def _mixes(n: Node, batch: set[int]) -> str | None:
    """What in node ``n`` (with a batch tensor among its inputs) mixes the batch, or None."""
    if n.op in ("getitem", "setitem") and _is(n.args[0], batch):
        key = n.args[1]
        first = key.tuple[0] if isinstance(key, TupleV) and key.tuple else key
        if isinstance(first, Ref) and first.ref in batch and not isinstance(key, TupleV):
            return None   # a mask over the whole value: the same elements, in the same order
        if not (isinstance(first, EllipsisV) or first is None or (
                isinstance(first, SliceV) and tuple(first.slice) == (None, None, None))):
            return "indexing the batch dimension (x[i], x[:1], x[[...]])"
        return None
    name = n.kwargs.get("name") if n.op == "method" else None
    if n.op == "call":
        name = str(n.kwargs.get("fn", "")).rpartition(".")[2]
    if name is None:
        return None
    rest = n.args[1:]
    if name == "norm":   # norm(p, dim): its first argument is the order
        rest = rest[1:]
    dim = n.kwargs.get("dim", n.kwargs.get("axis", rest[0] if rest else None))
    if name in REDUCTIONS and (n.op == "method" or _is(n.args[0] if n.args else None, batch)):
        if dim is None or _has_zero(dim):
            return f".{name}() over the batch dimension" if dim is not None else \
                f".{name}() without a dim"
    if name in JOINS and n.op == "call":
        if _has_zero(0 if dim is None else dim) or name in ("vstack", "row_stack"):
            return f"torch.{name}(...) along the batch dimension"
    return None


def _is(arg: Any, batch: set[int]) -> bool:
    return isinstance(arg, Ref) and arg.ref in batch


def _has_zero(dim: Any) -> bool:
    if isinstance(dim, bool):
        return False
    if isinstance(dim, int):
        return dim == 0
    if isinstance(dim, (ListV, TupleV)):
        return any(_has_zero(d) for d in (dim.list if isinstance(dim, ListV) else dim.tuple))
    return False

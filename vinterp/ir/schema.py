"""The intervention graph (IR): the one contract between library, vLLM plugin and server.

A trace compiles to a :class:`Graph`: an ordered list of :class:`Node` s, each an allowlisted op
whose arguments are JSON values, references to earlier nodes, or tensor constants held in the
graph's tensor table. There is no code, pickle or callable anywhere in it, so a server can run
graphs sent by strangers.

Example::

    >>> from vinterp.ir import Graph, Node, Ref
    >>> g = Graph(nodes=[
    ...     Node(id=0, op="read", kwargs={"module": "model.layers.3", "kind": "output"}),
    ...     Node(id=1, op="save", args=[Ref(ref=0)]),
    ... ])
    >>> Graph.model_validate_json(g.model_dump_json()) == g
    True
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

IR_VERSION = 1

#: dtypes a tensor constant may have (names as in ``torch``).
DTYPES = (
    "float16", "bfloat16", "float32", "float64",
    "int8", "int16", "int32", "int64", "uint8", "bool",
)

DType = Literal[
    "float16", "bfloat16", "float32", "float64",
    "int8", "int16", "int32", "int64", "uint8", "bool",
]


class _Strict(BaseModel):
    # ser_json_inf_nan: inf and nan arguments (clamp(max=float("inf")), a -inf mask fill) stay
    # themselves in JSON, as Python's json module writes them, instead of becoming null
    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="constants")


class Ref(_Strict):
    """A reference to the value of an earlier node."""

    ref: int


class TensorRef(_Strict):
    """A reference to a constant in :attr:`Graph.tensors` (the blob section)."""

    tensor: int


class SliceV(_Strict):
    """A Python ``slice(start, stop, step)``; entries may be node references."""

    slice: tuple[Value, Value, Value]


class EllipsisV(_Strict):
    """Python's ``...`` inside an index."""

    ellipsis: Literal[True] = True


class ListV(_Strict):
    """A list of values (kept distinct from tuples: indexing treats them differently)."""

    list: tuple[Value, ...]


class TupleV(_Strict):
    """A tuple of values."""

    tuple: tuple[Value, ...]


class DictV(_Strict):
    """A dict with string keys (JSON: ``{"mapping": {...}}``)."""

    mapping: dict[str, Value]


class DTypeV(_Strict):
    """A torch dtype, e.g. as the argument of ``.to(torch.float16)``."""

    dtype: DType


#: the tag of each wrapped value kind: its class, or (in JSON / dict input) its one key
_WRAPPED: dict[Any, str] = {
    Ref: "ref", TensorRef: "tensor", SliceV: "slice", EllipsisV: "ellipsis", ListV: "list",
    TupleV: "tuple", DictV: "mapping", DTypeV: "dtype",
}
_KEYS = frozenset(_WRAPPED.values())
_SCALARS: dict[type, str] = {type(None): "none", bool: "bool", int: "int", float: "float",
                             str: "str"}


def _value_tag(v: Any) -> str | None:
    """Which member of :data:`Value` ``v`` is, without trying them all.

    Graphs have tens of thousands of values; a plain union makes pydantic try every member in
    turn (building an error for each miss), which made parsing a request's graph in the vLLM
    worker cost more than its forward. Unknown shapes get ``None``, which pydantic reports as
    the ``ir_value`` error below, which lists what a value may be.
    """
    tag = _SCALARS.get(type(v)) or _WRAPPED.get(type(v))
    if tag is not None:
        return tag
    if isinstance(v, dict) and len(v) == 1:
        (key,) = v
        return key if key in _KEYS else None
    if isinstance(v, int):  # subclasses (an IntEnum, say) validate as their base type
        return "bool" if isinstance(v, bool) else "int"
    if isinstance(v, float):
        return "float"
    if isinstance(v, str):
        return "str"
    return None


Value = Annotated[
    Union[
        Annotated[None, Tag("none")], Annotated[bool, Tag("bool")], Annotated[int, Tag("int")],
        Annotated[float, Tag("float")], Annotated[str, Tag("str")],
        Annotated[Ref, Tag("ref")], Annotated[TensorRef, Tag("tensor")],
        Annotated[SliceV, Tag("slice")], Annotated[EllipsisV, Tag("ellipsis")],
        Annotated[ListV, Tag("list")], Annotated[TupleV, Tag("tuple")],
        Annotated[DictV, Tag("mapping")], Annotated[DTypeV, Tag("dtype")],
    ],
    Discriminator(
        _value_tag, custom_error_type="ir_value",
        custom_error_message="not an IR value: expected null, a bool, number or string, or an "
                             "object with exactly one of the keys ref, tensor, slice, ellipsis, "
                             "list, tuple, mapping, dtype (write a JSON array as "
                             "{\"list\": [...]})"),
]
SliceV.model_rebuild()
ListV.model_rebuild()
TupleV.model_rebuild()
DictV.model_rebuild()


class TensorData(_Strict):
    """A tensor constant: dtype, shape and the raw little-endian bytes in base64."""

    dtype: DType
    shape: tuple[int, ...]
    data: str = Field(description="base64 of the contiguous little-endian bytes")


class NamedTensor(_Strict):
    """A tensor constant the server fills in: the caller's named vector (``PUT
    /v1/vectors/{name}``), for ``layer`` when it holds one vector per layer.

    Only a server resolves names (for the key that owns them); a graph with a named tensor
    cannot run anywhere else.
    """

    named: str
    layer: int | None = None
    dtype: DType = "float32"
    shape: tuple[int, ...]


class SessionValue(_Strict):
    """A tensor constant the server fills in within one session request
    (``model.session()`` run remotely): the value save node ``node`` of the session's
    earlier graph ``trace`` returned. ``shape`` is what the client knew at trace time
    (``()`` when unknown); the server checks it when it is given.

    Only a server running the whole session resolves these; a graph holding one cannot run
    anywhere else.
    """

    trace: int = Field(ge=0)
    node: int = Field(ge=0)
    dtype: DType = "float32"
    shape: tuple[int, ...] = ()


class Steps(_Strict):
    """The generation steps a node runs at: ``start <= step < stop`` (``stop=None``: all).

    Step 0 is the forward over the whole prompt; step s produces new token s+1.
    """

    start: int = 0
    stop: int | None = 1


class Node(_Strict):
    """One operation of the graph.

    ``op`` names an allowlisted operation (see :mod:`vinterp.ir.ops`); ``invoke`` says which
    prompt group (``tracer.invoke``) the node belongs to; ``steps`` which generation steps it
    runs at. ``line`` is the user's source location, kept for error messages only.
    """

    id: int
    op: str
    args: tuple[Value, ...] = ()
    kwargs: dict[str, Value] = Field(default_factory=dict)
    invoke: int = 0
    steps: Steps = Steps()
    line: str | None = None


class Invoke(_Strict):
    """One ``tracer.invoke``: its prompts as token ids (one list per prompt).

    ``generation`` overrides the graph's generation arguments for this invoke only (e.g. its
    own ``max_new_tokens``), so requests of different lengths share one batch.
    """

    prompts: tuple[tuple[int, ...], ...]
    generation: dict[str, Value] = Field(default_factory=dict)
    #: the model's other per-token inputs each prompt came with (a tokenizer output's
    #: ``token_type_ids``, LayoutLM's ``bbox``...): per prompt, name → a constant of
    #: :attr:`Graph.tensors` with one entry per token (first dim); ``{}`` for none. Empty when
    #: no prompt has any. Only the hf backend can feed them to the model
    token_inputs: tuple[dict[str, TensorRef], ...] = ()


class Graph(_Strict):
    """A whole trace: invokes (inputs), nodes in program order, tensor constants.

    ``mode`` is ``"trace"`` (one forward) or ``"generate"``; ``generation`` holds the
    generation arguments (HF or vLLM names) and is empty for ``"trace"``.
    """

    version: Literal[1] = IR_VERSION
    mode: Literal["trace", "generate"] = "trace"
    invokes: tuple[Invoke, ...] = ()
    nodes: tuple[Node, ...] = ()
    tensors: tuple[TensorData | NamedTensor | SessionValue, ...] = ()
    generation: dict[str, Value] = Field(default_factory=dict)

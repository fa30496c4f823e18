"""The intervention graph (IR): schema, allowlisted ops, tensor encoding, validation.

Example::

    >>> from vinterp import ir
    >>> schema = ir.json_schema()          # publish to clients in other languages
    >>> g = ir.load('{"nodes": []}')        # validate graphs from anyone
"""

from vinterp.ir.schema import (
    IR_VERSION, DictV, DTypeV, EllipsisV, Graph, Invoke, ListV, NamedTensor, Node, Ref,
    SessionValue, SliceV, Steps, TensorData, TensorRef, TupleV, Value,
)
from vinterp.ir.tensors import decode_tensor, encode_tensor
from vinterp.ir.validate import GraphError, dumps, json_schema, load, to_dict

__all__ = [
    "IR_VERSION", "DTypeV", "DictV", "EllipsisV", "Graph", "GraphError", "Invoke", "ListV",
    "NamedTensor", "Node", "Ref", "SessionValue", "SliceV", "Steps", "TensorData", "TensorRef",
    "TupleV", "Value",
    "decode_tensor", "dumps", "encode_tensor", "json_schema", "load", "to_dict",
]

"""Renumbering the node references (and tensor constants) inside IR values.

The tracer copies nodes into other graphs (the device graph, a meta pass, the model's edits)
with new ids; this is the one walk over IR values that does it.
"""

from __future__ import annotations

from typing import Any

from vinterp.ir.schema import DictV, ListV, Ref, SliceV, TensorRef, TupleV


def _remap(value: Any, ids: dict[int, int], tensor_base: int = 0) -> Any:
    """``value`` (IR args/kwargs) with node references renumbered by ``ids`` (and tensor
    constants shifted by ``tensor_base``)."""
    if isinstance(value, Ref):
        return Ref(ref=ids[value.ref])
    if isinstance(value, TensorRef):
        return TensorRef(tensor=value.tensor + tensor_base) if tensor_base else value
    if isinstance(value, tuple):
        return tuple(_remap(v, ids, tensor_base) for v in value)
    if isinstance(value, dict):
        return {k: _remap(v, ids, tensor_base) for k, v in value.items()}
    if isinstance(value, ListV):
        return ListV(list=_remap(value.list, ids, tensor_base))
    if isinstance(value, TupleV):
        return TupleV(tuple=_remap(value.tuple, ids, tensor_base))
    if isinstance(value, SliceV):
        return SliceV(slice=_remap(value.slice, ids, tensor_base))
    if isinstance(value, DictV):
        return DictV(mapping=_remap(value.mapping, ids, tensor_base))
    return value

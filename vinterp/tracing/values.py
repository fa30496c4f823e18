"""Converting the Python values a trace is given into IR values.

Every argument of a recorded operation (proxies, tensors, numbers, slices, containers of
those...) becomes an IR ``Value``: a proxy of the trace a ``Ref`` to its node, a tensor an
entry of the trace's tensor table (once per tensor object), a saved value of an earlier trace
of a remote session an ``ir.SessionValue`` the server fills in. Separate from the tracer: a
walk over values with its caches, called for each node it records.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vinterp import ir
from vinterp.backends.remote import NamedVector
from vinterp.ir.schema import DictV, DTypeV, EllipsisV, ListV, Ref, SliceV, TensorRef, TupleV, Value
from vinterp.ir.tensors import dtype_name, encode_tensor
from vinterp.tracing.errors import TracingError
from vinterp.tracing.proxy import Proxy

if TYPE_CHECKING:
    from vinterp.tracing.tracer import Tracer

#: converted index keys (IR values are frozen, so one object serves every node using it)
_KEYS: dict[tuple, TupleV] = {}


def _plain_key(v: tuple) -> tuple | None:
    """A hashable stand-in for a tuple of ints, ``None``, ``...`` and slices of ints and
    ``None`` (``x[:, -1]``'s key), or ``None`` for anything else. Exact types: ``True`` and
    ``1.0`` must not share ``1``'s entry."""
    out: list[Any] = []
    for x in v:
        t = type(x)
        if t is int or x is None or x is Ellipsis:
            out.append(x)
        elif t is slice:
            parts = (x.start, x.stop, x.step)
            if not all(p is None or type(p) is int for p in parts):
                return None
            out.append((slice, *parts))
        else:
            return None
    return tuple(out)


def ir_value(tracer: Tracer, v: Any) -> Value:
    """``v`` as an IR value of ``tracer``'s graph (tensors go into its tensor table)."""
    if type(v) is tuple:   # an index key such as [:, -1]: converted once, then shared
        key = _plain_key(v)
        if key is not None:
            hit = _KEYS.get(key)
            if hit is None:
                if len(_KEYS) > 4096:
                    _KEYS.clear()
                hit = _KEYS[key] = TupleV(tuple=tuple(ir_value(tracer, x) for x in v))
            return hit
    if isinstance(v, Proxy):
        if v._tracer is not tracer:
            if v._has_value:   # saved in an earlier trace (model.session()): its value
                return ir_value(tracer, v._value)
            if tracer._session is not None and tracer._session.holds(v._tracer):
                return TensorRef(tensor=_session_value(tracer, v))
            raise TracingError("a value of another trace was used here: .save() it in "
                               "its own trace and pass the saved value instead")
        return Ref(ref=v._id)
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, torch.Tensor):
        return TensorRef(tensor=_constant(tracer, v))
    if isinstance(v, NamedVector):   # the server fills it in (remote=True)
        tracer.tensors.append(ir.NamedTensor(named=v.name, layer=v.layer,
                                             shape=(int(tracer.lm.config.hidden_size),)))
        return TensorRef(tensor=len(tracer.tensors) - 1)
    if isinstance(v, np.ndarray):
        return TensorRef(tensor=_constant(tracer, torch.from_numpy(v)))
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    if isinstance(v, slice):
        return SliceV(slice=(ir_value(tracer, v.start), ir_value(tracer, v.stop),
                             ir_value(tracer, v.step)))
    if v is Ellipsis:
        return EllipsisV()
    if isinstance(v, torch.Size):
        return TupleV(tuple=tuple(int(s) for s in v))
    if isinstance(v, tuple):
        return TupleV(tuple=tuple(ir_value(tracer, x) for x in v))
    if isinstance(v, list):
        return ListV(list=tuple(ir_value(tracer, x) for x in v))
    if isinstance(v, dict):
        return DictV(mapping={str(k): ir_value(tracer, x) for k, x in v.items()})
    if isinstance(v, torch.dtype):
        return DTypeV(dtype=dtype_name(v))
    if isinstance(v, torch.device):
        return str(v)
    raise TracingError(
        f"a {type(v).__name__} cannot be part of an intervention graph; use tensors, "
        "numbers, strings, slices, lists/tuples/dicts of those, or proxies")


def _constant(tracer: Tracer, t: torch.Tensor) -> int:
    """The tensor-table index of ``t``, added once however many nodes use it."""
    key = id(t)
    hit = tracer._const_ids.get(key)
    if hit is not None and hit[0] is t:
        return hit[1]
    tracer.tensors.append(encode_tensor(t))
    tracer._const_ids[key] = (t, len(tracer.tensors) - 1)
    return len(tracer.tensors) - 1


def _session_value(tracer: Tracer, v: Proxy) -> int:
    """The tensor-table index of ``v`` (a saved value of an earlier trace of this remote
    session, not run yet): an :class:`ir.SessionValue` the server fills in."""
    other: Tracer = v._tracer
    assert tracer._session is not None
    if not any(p._id == v._id for p in other.saved):
        raise TracingError(
            "a value of an earlier trace of this session was used without .save(): save "
            "it in its own trace, then use the saved value here")
    if v._id in other._post:
        raise TracingError(
            "values computed from the generated ids cannot cross traces of a remote "
            "session (they are computed on this side after the generation); use the "
            "model's values, or run the session locally")
    key = (id(other), v._id)
    if key not in tracer._session_refs:
        node = other._device_ids[v._id] if other._device_ids is not None else v._id
        shape = other.known_shape(v._id)
        tracer.tensors.append(ir.SessionValue(
            trace=tracer._session.index(other), node=node,
            shape=tuple(shape) if isinstance(shape, torch.Size) else ()))
        tracer._session_refs[key] = len(tracer.tensors) - 1
    return tracer._session_refs[key]

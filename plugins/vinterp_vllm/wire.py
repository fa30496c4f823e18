"""Packing captured values into one bytes blob for the trip from the worker to the caller.

Captures are many small tensors (256 prompts x 30 layers of ``x[:, -1]`` is 7,680 of them).
``torch.save`` writes a record per tensor and ``torch.load`` rebuilds each through its storage
machinery, which cost more than the forward pass for such captures. Here every tensor's bytes
go into one buffer and the structure around them (dicts, lists, tuples, errors) is a small
pickle holding slots. Values the walk does not open (a model-output object, say) are pickled
as they are.

Only the engine this client started reads these bytes back (``pickle`` is not for strangers'
data; the HTTP server never forwards them).

Example::

    >>> import torch
    >>> odd = torch.arange(6.0).view(1, 2, 3)[:, -1, 2:]    # size-1 dims, odd strides
    >>> back = unpack(pack({"a": [torch.ones(2), (odd, "x")]}))
    >>> back["a"][0].tolist(), back["a"][1][0].tolist(), back["a"][1][1]
    ([1.0, 1.0], [[5.0]], 'x')
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class _Slot:
    """Where a tensor was: its index in the packed list."""

    index: int


def pack(obj: Any) -> bytes:
    """``obj`` (nested dicts/lists/tuples of tensors and plain values) as bytes."""
    tensors: list[torch.Tensor] = []

    def slot(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            tensors.append(v)
            return _Slot(len(tensors) - 1)
        return v

    skeleton = _map(obj, slot)
    meta, chunks = [], []
    for t in tensors:
        t = t.detach()
        meta.append((str(t.dtype).removeprefix("torch."), tuple(t.shape), str(t.device)))
        # bytes of any dtype (bfloat16 included) through a uint8 view of a dense 1-D copy
        # (``contiguous()`` may keep odd strides on size-1 dims, which ``view`` refuses)
        flat = torch.empty(t.numel(), dtype=t.dtype, device="cpu").copy_(t.reshape(-1))
        chunks.append(flat.view(torch.uint8).numpy().tobytes())
    return pickle.dumps((skeleton, meta, b"".join(chunks)), protocol=5)


def unpack(data: bytes) -> Any:
    """The object :func:`pack` packed; each tensor is its own copy on its original device."""
    skeleton, meta, blob = pickle.loads(data)  # noqa: S301 - our own engine's bytes
    flat = torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob else None
    tensors: list[torch.Tensor] = []
    at = 0
    for dtype_name, shape, device in meta:
        dtype = getattr(torch, dtype_name)
        n = dtype.itemsize * _numel(shape)
        # copy the bytes out first: a view at an odd offset cannot be reinterpreted
        t = flat[at:at + n].clone().view(dtype).reshape(shape) if n else \
            torch.empty(shape, dtype=dtype, device="cpu")
        at += n
        tensors.append(t if device == "cpu" else t.to(device))

    return _map(skeleton, lambda v: tensors[v.index] if type(v) is _Slot else v)


def _map(obj: Any, leaf: Any) -> Any:
    """``obj`` with ``leaf`` applied to everything inside its dicts, lists and tuples (exact
    types only: subclasses such as model-output objects are leaves)."""
    t = type(obj)
    if t is dict:
        return {k: _map(x, leaf) for k, x in obj.items()}
    if t is list:
        return [_map(x, leaf) for x in obj]
    if t is tuple:
        return tuple(_map(x, leaf) for x in obj)
    return leaf(obj)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n

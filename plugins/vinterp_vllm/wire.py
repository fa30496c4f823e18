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
class _Plain:
    """A leaf that is not a tensor, kept as it is (in the skeleton a bare int is a tensor's
    index: captures are thousands of tensors and a handful of other leaves, so the rare ones
    carry the wrapper)."""

    value: Any


#: byte alignment of each group in the blob, so every group can be read in its own dtype
_ALIGN = 16


def pack(obj: Any) -> bytes:
    """``obj`` (nested dicts/lists/tuples of tensors and plain values) as bytes.

    Tensors of one dtype and device travel as one block: one ``torch.cat`` (one device to
    host copy on a GPU) instead of a copy per tensor, which for 7,680 small captures cost
    more than the rest of the drain.
    """
    tensors: list[torch.Tensor] = []

    def slot(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            tensors.append(v)
            return len(tensors) - 1
        return _Plain(v)

    skeleton = _map(obj, slot)
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    where: list[tuple[int, int]] = [(0, 0)] * len(tensors)   # tensor -> (group, index in it)
    shapes = [tuple(t.shape) for t in tensors]
    header, chunks, at = [], [], 0
    for g, ((dtype, device), members) in enumerate(groups.items()):
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in members]).cpu()
        # bytes of any dtype (bfloat16 included) through a uint8 view
        data = flat.view(torch.uint8).numpy().tobytes()
        header.append((str(dtype).removeprefix("torch."), str(device), at,
                       [tensors[i].numel() for i in members]))
        for k, i in enumerate(members):
            where[i] = (g, k)
        pad = -len(data) % _ALIGN
        chunks.append(data + bytes(pad))
        at += len(data) + pad
    return pickle.dumps((skeleton, header, where, shapes, b"".join(chunks)), protocol=5)


def unpack(data: bytes) -> Any:
    """The object :func:`pack` packed; each tensor is its own copy on its original device
    (not a view of a shared buffer: ``torch.save`` of one capture writes that capture only)."""
    skeleton, header, where, shapes, blob = pickle.loads(data)  # noqa: S301 - our own engine
    buf = bytearray(blob)
    groups: list[list[torch.Tensor]] = []
    for dtype_name, device, offset, numels in header:
        dtype = getattr(torch, dtype_name)
        count = sum(numels)
        flat = torch.frombuffer(buf, dtype=dtype, offset=offset, count=count) if count else \
            torch.empty(0, dtype=dtype)
        if device != "cpu":
            flat = flat.to(device)
        groups.append(list(torch.split(flat, numels)))
    tensors = [groups[g][k].view(shape).clone() for (g, k), shape in zip(where, shapes,
                                                                          strict=True)]
    return _map(skeleton, lambda v: v.value if type(v) is _Plain else tensors[v])


def copies(obj: Any) -> Any:
    """``obj`` with each tensor inside its dicts, lists and tuples replaced by its own
    detached copy: what ``unpack(pack(obj))`` gives, for a reader in the same process."""
    return _map(obj, lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v)


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

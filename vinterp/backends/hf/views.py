"""Per-invoke views of batched HF values, and writing replacements back into the batch.

A point's batched value (a tensor, a tuple such as attention's ``(out, weights)``, an HF
``ModelOutput``, a dataclass, or a module's ``(args, kwargs)``) is cut to one invoke's rows
and to its sequence window: sequence dims are dim 1 of 3-D tensors and of 2-D integer ones
(token ids, masks, positions: a 2-D float value is ``[batch, features]``, such as a
classifier's logits), and dims 2-3 of 4-D ones (``[batch, heads, q, k]``), cut only where
their size is the current key length (so decode steps, with one query row, keep their single
row). Views share storage with the batch, so in-place edits write through.

Values that are not per example (a scalar loss, a tensor whose first dim is not the batch)
cannot be cut: every invoke sees, and edits, the whole batch's value, as in nnsight.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

_SEQ_DIMS = {2: (1,), 3: (1,), 4: (2, 3)}


class Region(NamedTuple):
    """One invoke's part of a batched value: its rows, and its sequence window
    ``[start, stop)`` of sequence dims whose size is ``key_len`` (of ``batch`` rows)."""

    rows: slice
    start: int
    stop: int
    key_len: int
    batch: int


def cut(value: Any, r: Region) -> Any:
    """The view of ``value`` for region ``r``: its rows, and its window of sequence dims."""
    if isinstance(value, torch.Tensor):
        return cut_tensor(value, r)
    return map_tensors(value, lambda _path, leaf: cut_tensor(leaf, r))


def cut_tensor(value: torch.Tensor, r: Region) -> torch.Tensor:
    """One tensor's view for region ``r`` (``value`` itself where it is not per example, or
    where the region is all of it)."""
    if value.dim() == 0 or value.shape[0] != r.batch:
        return value
    narrow = (r.start, r.stop) != (0, r.key_len)
    if not narrow and r.rows.start == 0 and r.rows.stop == r.batch:
        return value  # the invoke is the whole batch: the tensor itself (keeps autograd)
    out = value[r.rows]
    if narrow and not (value.dim() == 2 and value.is_floating_point()):
        for d in _SEQ_DIMS.get(value.dim(), ()):
            if out.shape[d] == r.key_len:
                out = out.narrow(d, r.start, r.stop - r.start)
    return out


#: a tensor's place in a structured value: tuple/list indices, dict keys and field names
LeafPath = tuple[int | str, ...]


def map_tensors(value: Any, fn: Callable[[LeafPath, torch.Tensor], Any],
                path: LeafPath = ()) -> Any:
    """``value`` rebuilt with each tensor in it replaced by ``fn(path, tensor)``.

    The one walk over point values (tuples, named tuples, lists, dicts and HF ``ModelOutput``s,
    dataclasses; anything else is kept as it is): :func:`cut`, the HF backend's per-invoke
    copies and :func:`assign_at` must agree on the structure and on the paths.
    """
    if isinstance(value, torch.Tensor):
        return fn(path, value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(map_tensors(v, fn, (*path, i)) for i, v in enumerate(value)))
    if isinstance(value, (list, tuple)):
        return type(value)(map_tensors(v, fn, (*path, i)) for i, v in enumerate(value))
    if isinstance(value, dict):
        # every entry (a module's kwargs hold tuples, caches, flags, None too)
        fields = {k: map_tensors(v, fn, (*path, k)) for k, v in value.items()}
        try:
            return type(value)(**fields)
        except TypeError:
            return fields
    if _is_dataclass(value):   # (an HF ModelOutput is a dict, above)
        return dataclasses.replace(value, **{k: map_tensors(v, fn, (*path, k))
                                             for k, v in _fields(value).items()})
    return value


def leaf_at(value: Any, path: LeafPath) -> Any:
    """The item of ``value`` at ``path`` (see :func:`map_tensors`); ``None`` where there is
    none (a keyword argument the caller left out)."""
    for key in path:
        if isinstance(value, (list, tuple)):
            value = value[key] if isinstance(key, int) and key < len(value) else None
        elif isinstance(value, dict):
            value = value.get(key)
        elif _is_dataclass(value):
            value = getattr(value, str(key), None)
        else:
            return None
    return value


def assign_at(full: Any, path: LeafPath, new: Any, r: Region, where: str,
              out_of_place: bool) -> Any:
    """:func:`assign` of ``new`` to the item of ``full`` at ``path``; returns the (maybe new)
    full value, its other items kept as they are."""
    if not path:
        return assign(full, new, r, where, out_of_place)
    key, rest = path[0], path[1:]
    if isinstance(full, (list, tuple)):
        items = list(full)
        items[key] = assign_at(items[key], rest, new, r, f"{where}[{key}]", out_of_place)
        return type(full)(*items) if hasattr(full, "_fields") else type(full)(items)
    if isinstance(full, dict):
        # in place, as assign does with mappings (the caller keeps the same object)
        full[key] = assign_at(full.get(key), rest, new, r, f"{where}.{key}", out_of_place)
        return full
    if _is_dataclass(full):
        item = assign_at(getattr(full, str(key)), rest, new, r, f"{where}.{key}", out_of_place)
        return dataclasses.replace(full, **{str(key): item})
    raise ValueError(f"cannot set {where}: its value is a {type(full).__name__}, not a "
                     "structure with items")


def _is_dataclass(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _fields(value: Any) -> dict[str, Any]:
    """A dataclass instance's fields that its constructor takes, by name."""
    return {f.name: getattr(value, f.name) for f in dataclasses.fields(value) if f.init}


def assign(full: Any, new: Any, r: Region, where: str, out_of_place: bool) -> Any:
    """Write ``new`` into ``full``'s region for one invoke; returns the (maybe new) full value.

    In place under ``no_grad`` (cheap); out of place when autograd is recording, so tensors
    saved for backward are never modified.
    """
    if isinstance(full, torch.Tensor):
        if isinstance(new, (tuple, list)) and any(
                isinstance(item, torch.Tensor) and item.dim() > 0 for item in new):
            # the transformers 4 idiom ``layer.output = (new,) + ...``: since transformers 5
            # a decoder layer returns a tensor, and torch.as_tensor would fail with a message
            # about Python scalars
            raise ValueError(
                f"cannot set {where} to a {type(new).__name__} of tensors: this point holds "
                "a tensor (in transformers 5 a decoder layer returns its hidden states as a "
                "tensor, not a tuple); assign a tensor: `... = new`, not `... = (new,)`")
        if not isinstance(new, torch.Tensor):
            new = torch.as_tensor(new, dtype=full.dtype, device=full.device)
        target = full.clone() if out_of_place else full
        region = cut(target, r)
        if region is target and target.dim() > 0 and target.shape[0] != r.batch:
            region = target
        try:
            region.copy_(new.expand_as(region) if new.shape != region.shape else new)
        except RuntimeError:
            raise ValueError(
                f"cannot set {where} to a value of shape {list(new.shape)}: the invoke's "
                f"value there has shape {list(region.shape)}") from None
        return target
    if isinstance(full, (list, tuple)):
        if not isinstance(new, (list, tuple)) or len(new) != len(full):
            raise ValueError(f"cannot set {where}: it is a {type(full).__name__} of "
                             f"{len(full)} items; assign one with the same structure")
        items = [
            f if (n is None or n is f) else assign(f, n, r, f"{where}[{i}]", out_of_place)
            for i, (f, n) in enumerate(zip(full, new, strict=True))
        ]
        return type(full)(*items) if hasattr(full, "_fields") else type(full)(items)
    if isinstance(full, dict):
        if not isinstance(new, dict):
            raise ValueError(f"cannot set {where}: assign a mapping with the same fields")
        for k, v in new.items():
            if v is full.get(k):
                continue   # (what the invoke read, handed back unchanged)
            full[k] = assign(full.get(k), v, r, f"{where}.{k}", out_of_place)
        return full
    if _is_dataclass(full):
        if type(new) is not type(full):
            raise ValueError(f"cannot set {where}: assign a {type(full).__name__} (the same "
                             "dataclass)")
        old, given = _fields(full), _fields(new)
        return dataclasses.replace(full, **{
            k: assign(v, given[k], r, f"{where}.{k}", out_of_place)
            for k, v in old.items() if given[k] is not None and given[k] is not v})
    if full is None or isinstance(full, (bool, int, float, str)):
        # nothing to cut per invoke (a flag, or no value yet): only a trace whose one invoke
        # is the whole batch may set it
        if r.rows == slice(0, r.batch) and (r.start, r.stop) == (0, r.key_len):
            return new
        raise ValueError(f"cannot set {where} from one of several invokes: its value "
                         f"({full!r}) is the whole batch's; set it in a trace with one invoke")
    raise ValueError(f"cannot set {where}: its value is a {type(full).__name__}")

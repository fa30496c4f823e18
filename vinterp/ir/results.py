"""A run's results on the wire: saves and generated ids as JSON plus one safetensors blob.

What ``POST /v1/traces`` returns and ``remote=True`` reads. Tensors go into a single
safetensors file (any dtype, bfloat16 too; no pickle on either side); the JSON keeps the
shape of each save (a tensor, a list per generation step, a tuple, a number, a dtype or a
device, as a local run returns them).

Example::

    >>> import torch
    >>> wire = encode_results({3: torch.ones(2), 4: [torch.zeros(1), 7], 5: torch.int8}, None)
    >>> saves, generated = decode_results(wire)
    >>> saves[3].tolist(), saves[4][1], saves[5], generated
    ([1.0, 1.0], 7, torch.int8, None)
"""

from __future__ import annotations

import base64
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from vinterp.ir.tensors import dtype_name, torch_dtype

_SCALARS = (type(None), bool, int, float, str)


def _pack(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().to("cpu").contiguous()
        return {"tensor": name}
    if isinstance(value, list):
        return {"list": [_pack(v, tensors) for v in value]}
    if isinstance(value, tuple):
        return {"tuple": [_pack(v, tensors) for v in value]}
    if isinstance(value, _SCALARS):
        return {"value": value}
    if isinstance(value, torch.dtype):   # x.dtype.save(): what a local run gives back
        return {"dtype": dtype_name(value)}
    if isinstance(value, torch.device):  # the server's device, as the server ran it
        return {"device": str(value)}
    raise TypeError(f"cannot send a saved {type(value).__name__} in results; save tensors, "
                    f"numbers, dtypes, or lists/tuples of them")


def _unpack(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if not isinstance(node, dict) or len(node) != 1:
        raise ValueError(f"malformed result value {node!r}")
    ((kind, inner),) = node.items()
    if kind == "tensor":
        return tensors[inner]
    if kind == "list":
        return [_unpack(v, tensors) for v in inner]
    if kind == "tuple":
        return tuple(_unpack(v, tensors) for v in inner)
    if kind == "value":
        return inner
    if kind == "dtype":
        return torch_dtype(inner)
    if kind == "device":
        return torch.device(inner)
    raise ValueError(f"malformed result value {node!r}")


def encode_results(saves: dict[int, Any], generated: list[torch.Tensor] | None
                   ) -> dict[str, Any]:
    """``{"saves": {node id: shape}, "generated": [[ids], ...] | None, "tensors": base64}``."""
    tensors: dict[str, torch.Tensor] = {}
    tree = {}
    for k, v in saves.items():
        try:
            tree[str(k)] = _pack(v, tensors)
        except TypeError as exc:   # a bad save is the caller's: a 400 naming it, not a 500
            raise ValueError(f"the save of node {k}: {exc}") from None
    blob = st_save(tensors) if tensors else b""
    return {"saves": tree,
            "generated": None if generated is None else [g.tolist() for g in generated],
            "tensors": base64.b64encode(blob).decode("ascii")}


def decode_results(data: dict[str, Any]) -> tuple[dict[int, Any], list[torch.Tensor] | None]:
    """The saves (node id → value) and generated ids of :func:`encode_results`."""
    blob = base64.b64decode(data.get("tensors") or "")
    tensors = st_load(blob) if blob else {}
    saves = {int(k): _unpack(v, tensors) for k, v in (data.get("saves") or {}).items()}
    gen = data.get("generated")
    generated = None if gen is None else [torch.tensor(g, dtype=torch.long) for g in gen]
    return saves, generated

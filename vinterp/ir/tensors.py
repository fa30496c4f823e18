"""Tensors in the IR: dtype + shape + base64 bytes, never pickle.

Example::

    >>> import torch
    >>> from vinterp.ir.tensors import encode_tensor, decode_tensor
    >>> t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    >>> torch.equal(decode_tensor(encode_tensor(t)), t)
    True
"""

from __future__ import annotations

import base64

import numpy as np
import torch

from vinterp.ir.schema import NamedTensor, SessionValue, TensorData

_TORCH = {
    "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
    "float64": torch.float64, "int8": torch.int8, "int16": torch.int16, "int32": torch.int32,
    "int64": torch.int64, "uint8": torch.uint8, "bool": torch.bool,
}
_NAMES = {v: k for k, v in _TORCH.items()}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for an IR dtype name (``"float32"`` → ``torch.float32``)."""
    return _TORCH[name]


def dtype_name(dtype: torch.dtype) -> str:
    """The IR name of a torch dtype; raises ``TypeError`` for dtypes the IR does not carry."""
    try:
        return _NAMES[dtype]
    except KeyError:
        raise TypeError(
            f"dtype {dtype} cannot be sent in an intervention graph; "
            f"use one of {sorted(_TORCH)}"
        ) from None


def encode_tensor(t: torch.Tensor) -> TensorData:
    """Encode a tensor (any device) as :class:`TensorData`."""
    t = t.detach().to("cpu").contiguous()
    name = dtype_name(t.dtype)
    # bfloat16 has no numpy dtype: ship its raw 16-bit pattern.
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    data = raw.numpy().astype(raw.numpy().dtype.newbyteorder("<"), copy=False).tobytes()
    return TensorData(dtype=name, shape=tuple(t.shape), data=base64.b64encode(data).decode())


def decode_tensor(td: TensorData | NamedTensor | SessionValue) -> torch.Tensor:
    """Decode :class:`TensorData` to a CPU tensor; checks the byte count against the shape."""
    if isinstance(td, SessionValue):
        raise ValueError(f"tensor constant: a value of the session's trace {td.trace} (node "
                         f"{td.node}) is filled in only by a vinterp server running the whole "
                         f"session (model.session(remote=True))")
    if isinstance(td, NamedTensor):
        raise ValueError(f"the named vector {td.named!r} lives on a vinterp server: run this "
                         f"trace with remote=True (or pass the tensor itself)")
    dtype = _TORCH[td.dtype]
    raw_bytes = base64.b64decode(td.data, validate=True)
    np_dtype = np.dtype("<i2") if dtype == torch.bfloat16 else (
        torch.empty((), dtype=dtype, device="cpu").numpy().dtype.newbyteorder("<")
    )
    count = int(np.prod(td.shape)) if td.shape else 1
    if len(raw_bytes) != count * np_dtype.itemsize:
        raise ValueError(
            f"tensor constant of shape {list(td.shape)} and dtype {td.dtype} needs "
            f"{count * np_dtype.itemsize} bytes, got {len(raw_bytes)}"
        )
    arr = np.frombuffer(raw_bytes, dtype=np_dtype).reshape(td.shape)
    t = torch.from_numpy(arr.copy())
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


def nbytes(td: TensorData | NamedTensor | SessionValue) -> int:
    """Size of the decoded tensor in bytes (without decoding it)."""
    count = int(np.prod(td.shape)) if td.shape else 1
    return count * torch.empty((), dtype=_TORCH[td.dtype]).element_size()

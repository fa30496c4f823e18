"""Steering kernels on ``[..., rows, hidden]`` tensors with absolute per-row positions.

The HF backend calls them on one invoke's ``[batch, seq, hidden]`` slice; the vLLM plugin's
vectorized path implements the same math for all requests of a step at once. Keeping the
position rules here, in one place, is what makes both backends agree.

Example::

    >>> import torch
    >>> x = torch.zeros(1, 4, 2)
    >>> apply_steering("steer", x, torch.arange(4), prompt_len=4,
    ...                vector=torch.tensor([1.0, 0.0]), scale=2.0, positions=[-1])
    >>> x[0, :, 0].tolist()
    [0.0, 0.0, 0.0, 2.0]
"""

from __future__ import annotations

from typing import Any

import torch

POSITION_WORDS = ("all", "prompt", "generated")


def _resolve(p: int, prompt_len: Any) -> Any:
    # Negative positions count back from the end of the prompt (the length is known up
    # front, so this is safe chunk by chunk and step by step).
    return p + prompt_len if p < 0 else p


def position_mask(spec: Any, positions: torch.Tensor, prompt_len: Any) -> torch.Tensor | None:
    """Boolean mask over rows whose absolute position matches ``spec``; ``None`` means all rows.

    ``spec``: ``None``/``"all"``, ``"prompt"``, ``"generated"``, an int, a list of ints, or a
    ``slice`` over absolute positions (negatives count back from the prompt's end).
    ``prompt_len`` is an int or a tensor broadcastable to ``positions`` (one per sequence).
    """
    if spec is None or spec == "all":
        return None
    if spec == "prompt":
        return positions < prompt_len
    if spec == "generated":
        return positions >= prompt_len
    if isinstance(spec, bool):
        raise ValueError(f"positions must be an int, list, slice or one of {POSITION_WORDS}")
    if isinstance(spec, int):
        return positions == _resolve(spec, prompt_len)
    if isinstance(spec, (list, tuple)):
        mask = torch.zeros_like(positions, dtype=torch.bool)
        for p in spec:
            mask |= positions == _resolve(int(p), prompt_len)
        return mask
    if isinstance(spec, slice):
        start = 0 if spec.start is None else _resolve(spec.start, prompt_len)
        step = 1 if spec.step is None else spec.step
        if step <= 0:
            raise ValueError("positions slice step must be positive")
        mask = positions >= start
        if spec.stop is not None:
            mask = mask & (positions < _resolve(spec.stop, prompt_len))
        if step != 1:
            mask = mask & ((positions - start) % step == 0)
        return mask
    raise ValueError(
        f"positions must be None, an int, a list of ints, a slice or one of {POSITION_WORDS}; "
        f"got {spec!r}"
    )


def _as_vector(v: Any, x: torch.Tensor, name: str) -> torch.Tensor:
    v = torch.as_tensor(v)
    if v.shape[-1:] != x.shape[-1:]:
        raise ValueError(
            f"{name} has shape {list(v.shape)} but the value it steers has hidden size "
            f"{x.shape[-1]}"
        )
    return v.to(device=x.device, dtype=x.dtype)


def _unit(v: torch.Tensor) -> torch.Tensor:
    norm = v.norm(dim=-1, keepdim=True)
    if bool((norm == 0).any()):
        raise ValueError("direction has zero norm; pass a nonzero direction")
    return v / norm


def apply_steering(
    op: str,
    x: torch.Tensor,
    row_positions: torch.Tensor,
    prompt_len: int,
    *,
    vector: Any = None,
    direction: Any = None,
    scale: float = 1.0,
    factor: float = 1.0,
    min: float | None = None,  # noqa: A002 - the public keyword users write
    max: float | None = None,  # noqa: A002
    positions: Any = None,
    **_: Any,
) -> None:
    """Apply one steering op to ``x`` in place (rows on dim -2, hidden on dim -1).

    ``row_positions`` holds the absolute position of each row, shaped like ``x.shape[:-1]``
    or broadcastable to it (``[seq]``); ``positions`` selects which rows to steer (see
    :func:`position_mask`).
    """
    if x.dim() < 2:
        raise ValueError(f"steering needs a [..., seq, hidden] tensor, got shape {list(x.shape)}")
    if row_positions.shape[-1] != x.shape[-2]:
        raise ValueError(f"{row_positions.shape[-1]} positions for {x.shape[-2]} rows")
    if isinstance(prompt_len, torch.Tensor):  # per-sequence lengths come from the host
        prompt_len = prompt_len.to(x.device)
    mask = position_mask(positions, row_positions.to(x.device), prompt_len)
    if mask is not None:
        mask = mask.expand(x.shape[:-1])
    rows = x if mask is None else x[mask]
    if rows.numel() == 0:
        return
    if op == "steer":
        new = rows + scale * _as_vector(vector, x, "steering vector")
    elif op == "scale":
        new = rows * factor
    elif op == "replace":
        new = _as_vector(vector, x, "replacement vector").expand_as(rows)
    elif op in ("ablate", "clamp"):
        d = _unit(_as_vector(direction, x, "direction"))
        proj = (rows * d).sum(-1, keepdim=True)
        if op == "ablate":
            new = rows - proj * d
        else:
            new = rows + (proj.clamp(min=min, max=max) - proj) * d
    else:
        raise ValueError(f"unknown steering op {op!r}")
    if mask is None:
        x.copy_(new)
    else:
        x[mask] = new

"""The guard against interventions that make activations inf or NaN.

Why: an intervention that overflows (a huge vector or scale, a division by zero) would put
inf/NaN into the KV cache. Blocks are reused after a request ends, and attention multiplies a
masked slot's value by a zero weight, which is NaN for NaN: other users' later requests would
come out NaN. So rows an intervention makes non-finite keep their values, and the request that
did it fails (``RequestState.fail_nonfinite``). A row that was not finite before, the model's
own overflow, is not blamed on it.

Example::

    new, bad = finite_rows(x, x + 1e38 * v)   # bad: which rows kept x (None: all finite)
"""

from __future__ import annotations

import math

import torch


def rows_finite(t: torch.Tensor) -> torch.Tensor:
    """Per row (last dim), whether it holds no inf/NaN, without a host sync.

    A row's float32 sum is inf/NaN exactly when the row holds one (finite activations cannot
    sum past 3e38): one reduction, far cheaper than an elementwise ``isfinite``."""
    return torch.isfinite(t.sum(-1, dtype=torch.float32))


def finite_rows(x: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``new`` with each row that is not all finite replaced by its row of ``x``, and which
    rows those were (``[R]`` bools, left on the device: no sync in the forward; the caller
    fails their requests at the step's end). Rows not finite in ``x`` are not counted.

    On the CPU, where looking costs no sync, one total decides the common case: a finite sum
    means every value is finite (an inf or NaN anywhere makes the sum inf or NaN), and then
    ``bad`` is ``None``. Only a step whose total is not finite pays for the per-row checks
    (seven tensor ops at every steered point and step otherwise)."""
    if new.device.type == "cpu":
        if math.isfinite(float(new.sum(dtype=torch.float32))):
            return new, None
        bad = ~rows_finite(new) & rows_finite(x)
        return (torch.where(bad.unsqueeze(-1), x, new) if bool(bad.any()) else new), bad
    bad = ~rows_finite(new) & rows_finite(x)
    return torch.where(bad.unsqueeze(-1), x, new), bad

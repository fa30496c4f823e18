"""The guard against interventions that make activations inf or NaN.

Why: an intervention that overflows (a huge vector or scale, a division by zero) would put
inf/NaN into the KV cache. Blocks are reused after a request ends, and attention multiplies a
masked slot's value by a zero weight, which is NaN for NaN: other users' later requests would
come out NaN. So rows an intervention makes non-finite keep their values, and the request that
did it fails (``RequestState.fail_nonfinite``). A row that was not finite before, the model's
own overflow, is not blamed on it.

An edit can also be finite where it is made and overflow further on (a vector of 1e20 at an
MLP's input: gate times up is inf): the rows at the point look fine, and the inf/NaN reaches
the KV cache a module later. :class:`OutputWatch` covers that: each step it checks the model's
output rows of the requests whose graphs write; a request found non-finite fails, and once it
is no longer scheduled the KV cache's inf/NaN values are zeroed, before another request's
forward can read the blocks it held. (The rows it wrote while finite stay as they were: a
cached prompt block is still right.)

Example::

    new, bad = finite_rows(x, x + 1e38 * v)   # bad: which rows kept x (None: all finite)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)


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


def to_host(flags: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """A host copy of ``flags`` that leaves the device without a sync: on a GPU a copy into
    pinned memory queued after the forward, and the CUDA event that marks it done (``None``
    elsewhere, where the copy is done on return). Read it once ``event.query()`` says so."""
    cuda = flags.is_cuda
    host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=cuda)
    host.copy_(flags, non_blocking=True)
    event = None
    if cuda:
        event = torch.cuda.Event()
        event.record()
    return host, event


#: why a request failed when its output went inf or NaN (see :class:`OutputWatch`)
OVERFLOW_DOWNSTREAM = (
    "the model's activations became inf or NaN in this request after its intervention (an "
    "edit too large for {dtype}, even if finite where it was made?); the request was stopped, "
    "and the inf/NaN it left in the KV cache is cleared before any other request can read it")


class OutputWatch:
    """Checks writing requests' rows of the model's output each step, and clears the KV
    cache of the ones that went non-finite once they stop running (see the module doc).

    The check leaves a flag per row; on a GPU they reach the host without a sync (a copy
    queued after the forward), and :meth:`resolve` reads the ones already there at the next
    step's start. It waits only for flags of requests leaving the batch (their blocks may go
    to others) and when outcomes are drained, as ``StepTables.blame`` does.
    """

    def __init__(self) -> None:
        #: checks not read yet: per-row flags (on the host), the copy's event (GPU), and per
        #: request (state, request id, rows)
        self._pending: list[tuple[torch.Tensor, Any, list[tuple[Any, str, int]]]] = []
        #: requests whose output went non-finite → whether they ran since the last clearing
        self.poisoned: dict[str, bool] = {}
        self.cleared = 0   # how many times the KV cache was cleared (for stats and tests)

    def watch(self, out: Any, writers: list[tuple[Any, Any]],
              index: Callable[[list[int]], torch.Tensor]) -> None:
        """Check the rows of ``writers`` (request state, its ``RowSpan``) in the forward's
        output ``out`` (``[tokens, hidden]``; anything else, e.g. pipeline stages'
        intermediate tensors, is not the model's output and is skipped)."""
        if not writers or not isinstance(out, torch.Tensor) or out.dim() != 2:
            return
        spans = [span for _, span in writers]
        # (spans come in batch order: back to back from row 0 they are a slice, no gather)
        if spans[0].start == 0 and all(a.stop == b.start for a, b in zip(spans, spans[1:])):
            x = out[: spans[-1].stop]
        else:
            x = out[index([r for sp in spans for r in range(sp.start, sp.stop)])]
        if not x.is_cuda and math.isfinite(float(x.sum(dtype=torch.float32))):
            return   # (as in finite_rows: one total decides the common case)
        self._pending.append((*to_host(rows_finite(x)),
                              [(st, span.req_id, span.n) for st, span in writers]))

    def resolve(self, dtype: torch.dtype, *, scheduled: set[str] | None = None) -> None:
        """Fail the requests whose output rows came out non-finite. Reads the flags already
        on the host; waits for the others only when one of their requests is not in
        ``scheduled`` (this step's requests), and for all when ``scheduled`` is None."""
        while self._pending:
            flags, event, owners = self._pending[0]
            if event is not None and not event.query():
                if scheduled is not None and all(r in scheduled for _, r, _ in owners):
                    return
                event.synchronize()
            self._pending.pop(0)
            ok = flags.tolist()
            at = 0
            for st, req_id, n in owners:
                if not all(ok[at:at + n]):
                    st.fail(OVERFLOW_DOWNSTREAM.format(dtype=dtype))
                    self.poisoned[req_id] = True
                at += n

    def clear_if_gone(self, scheduled: set[str], alive: Callable[[str], bool],
                      kv_caches: list[torch.Tensor]) -> None:
        """Before a forward: if a poisoned request that ran since the last clearing is not
        scheduled now (finished, aborted or preempted: its blocks may go to others), zero
        the KV cache's inf/NaN values; forget the requests vLLM no longer knows."""
        if not self.poisoned:
            return
        cleared = any(dirty and r not in scheduled for r, dirty in self.poisoned.items())
        if cleared:
            clear_non_finite(kv_caches)
            self.cleared += 1
        # a poisoned request running now writes more inf/NaN: clear again once it stops
        self.poisoned = {r: (dirty and not cleared) or r in scheduled
                         for r, dirty in self.poisoned.items() if r in scheduled or alive(r)}


def clear_non_finite(tensors: list[torch.Tensor]) -> None:
    """Zero every inf/NaN value in ``tensors`` in place (KV cache layers: the layout does not
    matter, finite values are left alone)."""
    for t in tensors:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            continue
        try:
            torch.nan_to_num_(t, nan=0.0, posinf=0.0, neginf=0.0)
        except RuntimeError as exc:   # e.g. an fp8 cache without nan_to_num
            log.error("vinterp: could not clear inf/NaN from a %s KV cache tensor: %s",
                      t.dtype, exc)

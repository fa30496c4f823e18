"""Reading and writing a point's rows in vLLM's tensors, presented the way HF shapes them.

Two views of the same hook arguments:

* :func:`point_rows` — ``get(rows) -> [R, hidden]`` copies and ``put(rows, new)`` for the
  vectorized path (any rows of the batch at once).
* :class:`RowsEvent` — one request's contiguous rows as an HF-shaped value (``[1, seq, hidden]``,
  attention as ``(out, None)``, logits, model output) for the general graph runner.

At a fused decoder layer the residual stream is ``hidden + residual``; a write stores the new
stream in ``hidden`` and zeroes ``residual`` for those rows, so the next fused add gives exactly
the new value (``x + 0 == x``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

from vinterp_vllm.calls import ModuleCalls
from vinterp_vllm.layout import RowSpan
from vinterp_vllm.points import LOGIT_VALUES, VllmPoint

#: one :class:`ModuleCalls` per vLLM model (``call_module`` nodes: the logit lens)
_CALLS: weakref.WeakKeyDictionary[Any, ModuleCalls] = weakref.WeakKeyDictionary()


def _pair(args: tuple, kwargs: dict, out: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden, residual) of a fused layer at its input (pre-hook) or output."""
    if out is not None:
        return out[0], out[1]
    hidden = args[1] if len(args) > 1 else kwargs["hidden_states"]
    residual = args[2] if len(args) > 2 else kwargs.get("residual")
    return hidden, residual


def _tensor(value: str, args: tuple, kwargs: dict, out: Any,
            batch_dim: bool = False) -> torch.Tensor:
    """The plain ``[tokens, hidden]`` tensor at a non-residual point (a view: writes land).

    ``batch_dim``: the module sees HF's ``[1, tokens, hidden]`` (vLLM's Transformers backend).
    """
    if out is None:   # the module's input: the hidden states, not positions (int) before them
        x = kwargs.get("hidden_states")
        if x is None:
            x = next(a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point())
    elif isinstance(out, (tuple, list)):  # a fused norm's (normed, residual); HF (out, weights)
        x = out[0]
    else:
        x = out
    return x[0] if batch_dim else x


def _take(t: torch.Tensor, idx: torch.Tensor | slice) -> torch.Tensor:
    """Rows ``idx`` of ``t``: for a slice (consecutive rows) a view, not a gathered copy, so
    callers that keep it must copy it (the fast path only passes slices to steering ops)."""
    return t[idx] if isinstance(idx, slice) else t.index_select(0, idx)


def _store(t: torch.Tensor, idx: torch.Tensor | slice, new: torch.Tensor | int) -> None:
    """Write rows ``idx`` of ``t`` (a slice assignment for consecutive rows)."""
    if isinstance(idx, slice):
        t[idx] = new
    elif isinstance(new, int):
        t.index_fill_(0, idx, new)
    else:
        t.index_copy_(0, idx, new)


def point_rows(value: str, args: tuple, kwargs: dict, out: Any, batch_dim: bool = False
               ) -> tuple[Callable[[torch.Tensor], torch.Tensor],
                          Callable[[torch.Tensor, torch.Tensor], None]]:
    """Row accessors for the vectorized path at a point whose value kind is ``value``."""
    if value == "residual":
        h, r = _pair(args, kwargs, out)

        def get(idx: torch.Tensor) -> torch.Tensor:
            return _take(h, idx) if r is None else _take(h, idx) + _take(r, idx)

        def put(idx: torch.Tensor, new: torch.Tensor) -> None:
            _store(h, idx, new.to(h.dtype))
            if r is not None:
                _store(r, idx, 0)
        return get, put
    x = _tensor(value, args, kwargs, out, batch_dim)

    def get_t(idx: torch.Tensor) -> torch.Tensor:
        return _take(x, idx)

    def put_t(idx: torch.Tensor, new: torch.Tensor) -> None:
        _store(x, idx, new.to(x.dtype))
    return get_t, put_t


class RowsEvent:
    """A :class:`~vinterp.ir.interpreter.PointEvent` over one request's rows of the batch."""

    def __init__(self, point: VllmPoint, span: RowSpan, step: int, args: tuple, kwargs: dict,
                 out: Any, model: Any, *, trace: bool,
                 logits: torch.Tensor | None = None) -> None:
        self.module, self.kind, self.step = point.hf_module, point.hf_kind, step
        self._p, self._span, self._trace = point, span, trace
        self._args, self._kwargs, self._out, self._model = args, kwargs, out, model
        self._value: Any = None
        self._dirty = False
        self._first_row = span.start
        a, b = span.start, span.stop
        v = point.value
        if v == "residual":
            self._value = self._before().unsqueeze(0)
            self._dirty = True  # a fresh sum: always written back (exact, see module doc)
        elif v in ("tensor", "norm", "attn"):
            # a copy of vLLM's rows, written back after the graph ran (write_back): an
            # assignment then replaces the copy and leaves what earlier reads hold alone, as
            # a PyTorch hook returning a new tensor does (writing into vLLM's rows would
            # change those reads too)
            self._rows = _tensor(v, args, kwargs, out, point.batch_dim)[a:b]
            copy = self._rows.unsqueeze(0).clone()
            self._value = (copy, None) if v == "attn" else copy
            self._dirty = True  # in-place edits of the copy must land too
        else:
            # ``logits``: this request's rows, which the worker computes with the step's
            # other requests' in one call (``logit_rows.batched_logits``); a trace sees every
            # prompt position, a generation step the sampled one
            assert logits is not None, "a logits point's event needs logits="
            if not trace:
                self._first_row = b - 1
            logits = logits.unsqueeze(0)
            if v == "logits":
                self._value = logits
            else:
                from transformers.modeling_outputs import CausalLMOutputWithPast

                self._value = CausalLMOutputWithPast(logits=logits)

    def get(self, invoke: int) -> Any:
        return self._value

    @property
    def call_module(self) -> ModuleCalls:
        """How ``call_module`` nodes call the model's final norm and LM head on values
        (holds the model only, not this step's tensors)."""
        calls = _CALLS.get(self._model)
        if calls is None:
            calls = _CALLS[self._model] = ModuleCalls(self._model)
        return calls

    def set(self, invoke: int, value: Any) -> None:
        if self._p.value in LOGIT_VALUES:
            raise ValueError("writing logits is not supported on the vllm backend yet "
                             "(vLLM samples from its own logits); use backend='hf'")
        if self._p.value == "attn" and isinstance(value, tuple):
            value = value[0]
        old = self._value[0] if isinstance(self._value, tuple) else self._value
        value = torch.as_tensor(value).to(old.dtype)
        if value.shape != old.shape:
            value = value.expand_as(old)  # raises a clear shape error when it cannot
        value = value.clone()   # (the old value stays as earlier reads saw it)
        self._value = (value, None) if isinstance(self._value, tuple) else value
        self._dirty = True

    def row_positions(self, invoke: int) -> torch.Tensor:
        s = self._span
        first = s.first_pos + (self._first_row - s.start)
        return torch.arange(first, s.last_pos + 1).unsqueeze(0)

    def prompt_lens(self, invoke: int) -> torch.Tensor:
        return torch.tensor([[self._span.prompt_len]])

    def _before(self) -> torch.Tensor:
        """This request's rows as vLLM still holds them (nothing is written before
        :meth:`write_back`); at a fused layer, the stream ``hidden + residual``. Always a
        fresh tensor: the graph edits what it gets in place, and an edit must reach vLLM's
        tensors only through :meth:`write_back`, which refuses inf and NaN (at the first
        layer's input vLLM has no residual yet, and a view of ``hidden`` let an in-place
        ``x[:] = x / 0`` through)."""
        if self._p.value != "residual":
            return self._rows
        a, b = self._span.start, self._span.stop
        h, r = _pair(self._args, self._kwargs, self._out)
        return h[a:b].clone() if r is None else h[a:b] + r[a:b]

    def write_back(self) -> None:
        """Store the value (edited in place or replaced) into vLLM's tensors."""
        if not self._dirty:
            return
        new = self._value[0] if isinstance(self._value, tuple) else self._value
        if not bool(torch.isfinite(new).all()) and bool(torch.isfinite(self._before()).all()):
            # never into vLLM's tensors: the KV cache would carry it to other requests
            # (see finite.py); the caller fails this request
            raise ValueError(
                f"the graph made {self.module or 'model'}.{self.kind} inf or NaN for this "
                f"request (a division by zero, an overflow?); the request was stopped and the "
                f"value was not written, so no other request can see it")
        if self._p.value != "residual":
            self._rows.copy_(new[0])
            return
        a, b = self._span.start, self._span.stop
        h, r = _pair(self._args, self._kwargs, self._out)
        h[a:b] = new[0]
        if r is not None:
            r[a:b] = 0

"""``NNsight``: trace any ``torch.nn.Module`` as ``LanguageModel`` traces a causal LM.

Envoys follow the module tree (``model.fc1.output``, ``model.blocks[0].input``); the inputs
are whatever the module's ``forward`` takes. Invokes are batched along dim 0 and each sees
its own rows, as on ``LanguageModel``.

Example::

    from vinterp import NNsight
    net = NNsight(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
                                      torch.nn.Linear(8, 2)))
    with net.trace(torch.randn(3, 4)):
        hidden = net[0].output.save()
        net[1].output[:] = 0                  # an edit
        out = net.output.save()

Inputs: ``trace(x)`` / ``tracer.invoke(x)`` call ``forward(x)``; ``trace(x, y, flag=True)``
and ``tracer.invoke(x, y, flag=True)`` call ``forward(x, y, flag=True)`` (nnsight's
``invoke(*args, **kwargs)``; a dict or tuple is one argument in both). Invokes are joined
with ``torch.cat`` along dim 0, argument by argument (other values must be equal across
invokes); pass ``batch=`` (a function from a list of ``(args, kwargs)`` pairs to one pair)
where that does not fit.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from vinterp.backends.base import Backend
from vinterp.language_model import LanguageModel, _check_rename, meta_copy
from vinterp.tracing.envoy import Envoy
from vinterp.tracing.errors import TracingError
from vinterp.tracing.tracer import Tracer

Inputs = tuple[tuple[Any, ...], dict[str, Any]]
Batcher = Callable[[list[Inputs]], Inputs]


class _Call:
    """Arguments of one call: ``NNsight.trace(*args, **kwargs)``."""

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.args = args
        self.kwargs = kwargs


class NNsight(LanguageModel):
    """Any ``torch.nn.Module``, traced with the ``LanguageModel`` API (hf backend, hooks).

    ``batch``: how several invokes' ``(args, kwargs)`` become one call (default: tensors
    concatenated along dim 0). ``rename=`` as on :class:`LanguageModel`.
    ``model._model`` is the module itself.
    """

    def __init__(self, module: nn.Module, *, batch: Batcher | None = None,
                 rename: dict[Any, str | list[str]] | None = None) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"NNsight wraps a torch.nn.Module, not {type(module).__name__}")
        from vinterp.backends.hf import HfBackend

        self._edits: list[Any] = []
        self._tracers: list[Tracer] = []
        self._meta_backend: Backend | None = None
        self._ran_modules: set[str] | None = None
        #: modules a forward calls, by the inputs (their keys) it last ran on
        #: (see _cacheable_paths)
        self._ran_by_inputs: dict[tuple[int, ...], set[str]] = {}
        self._from_object = True
        self.path = None  # type: ignore[assignment]
        self.config = getattr(module, "config", None)
        self.tokenizer = None
        self.architecture = None
        self.backend_name = "hf"
        self._pad_id = 0
        self._batch: Batcher = batch or concat_inputs
        #: each invoke's inputs, by the key its placeholder rows carry (see _tokenize)
        self._inputs: dict[int, Inputs] = {}
        self._keys = itertools.count()
        self._model = module
        self._backend = HfBackend(module, None, 0, None, feed=self._feed)
        self._rename = _check_rename(module, rename or {})

    # ------------------------------------------------------------------ tracing API
    def trace(self, *args: Any, **kwargs: Any) -> Tracer:  # type: ignore[override]
        """Record interventions on ``module(*args, **kwargs)`` (or on the invokes' inputs,
        given with ``tracer.invoke(...)`` when no arguments are passed here)."""
        return Tracer(self, "trace", _call_of(args, kwargs))

    def scan(self, *args: Any, **kwargs: Any) -> Tracer:  # type: ignore[override]
        """Like :meth:`trace` on meta tensors: shapes without running the weights."""
        return Tracer(self, "trace", _call_of(args, kwargs), scan=True)

    def generate(self, *args: Any, **kwargs: Any) -> Tracer:  # type: ignore[override]
        raise TracingError("NNsight models have no generate(); use trace()")

    def edit(self, *args: Any, inplace: bool = False) -> Any:
        """Persistent edits, as :meth:`LanguageModel.edit` (inputs optional: only shapes)."""
        from vinterp.tracing.edit import EditTracer

        return EditTracer(self, _call_of(args, {}) or _Call((), {}), inplace=inplace)

    # ------------------------------------------------------------------ module tree
    def _alias_envoy(self, alias: str) -> Envoy:
        # no architecture table: `layers`, `embed`... are the module's own children, if any
        if alias in self._model._modules:
            return self._root._descend(alias)
        raise AttributeError(f"this module has no child {alias!r} (print(model) shows its "
                             "module tree)")

    def __getitem__(self, index: Any) -> Any:
        return self._root[index]

    # ------------------------------------------------------------------ inputs
    def _invoke_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]
                       ) -> tuple[Any, dict[str, Any]]:
        """``tracer.invoke(*args, **kwargs)``: the module's arguments, as ``trace`` takes
        them (a wrapped module has no generation settings)."""
        return _call_of(args, kwargs), {}

    def _prompts(self, inputs: Any) -> tuple[tuple[tuple[int, ...], ...], None]:
        """An invoke's placeholder rows (:meth:`_tokenize`); its inputs stay here, whole."""
        return self._tokenize(inputs), None

    def _tokenize(self, inputs: Any) -> tuple[tuple[int, ...], ...]:
        """Store an invoke's inputs; its rows in the IR are placeholders ``(key, row)``."""
        call = inputs if isinstance(inputs, _Call) else _Call((inputs,), {})
        rows = batch_size(call.args, call.kwargs)
        key = next(self._keys)
        self._inputs[key] = (call.args, call.kwargs)
        return tuple((key, r) for r in range(rows))

    def _push_tracer(self, tracer: Tracer) -> None:
        if not self._tracers:   # drop inputs of traces that have run
            live = {p[0][0] for p in tracer.invokes if p}
            for key in list(self._inputs):
                if key not in live:
                    del self._inputs[key]
        super()._push_tracer(tracer)

    def _feed(self, prompts: Sequence[tuple[tuple[int, ...], ...]],
              invokes: Sequence[int] | None, device: torch.device) -> Inputs:
        chosen = range(len(prompts)) if invokes is None else invokes
        parts = []
        for i in chosen:
            if not prompts[i]:
                continue   # a prompt-less invoke: the whole batch
            key = prompts[i][0][0]
            if key not in self._inputs:
                raise TracingError("this trace's inputs are gone (a trace runs once)")
            parts.append(self._inputs[key])
        args, kwargs = parts[0] if len(parts) == 1 else self._batch(parts)
        return _to(args, device), _to(kwargs, device)

    def _scan_backend(self) -> Backend:
        if self._meta_backend is None:
            from vinterp.backends.hf import HfBackend

            self._meta_backend = HfBackend(meta_copy(self._model), None, 0, None, scan=True,
                                           feed=self._feed)
        return self._meta_backend

    def _modules_that_run(self) -> set[str]:
        return {p for p, _ in self._model.named_modules()}

    def _cacheable_paths(self, tracer: Tracer) -> list[str] | None:
        """The modules ``forward`` calls on this trace's inputs (as nnsight's cache,
        which keeps whatever runs): a wrapped module may hold modules its forward does not
        call (an unused head, a branch chosen by an argument), whose reads would fail with
        "never reached". ``None`` while no invoke has inputs yet."""
        keys = tuple(p[0][0] for p in tracer.invokes if p)
        if not keys:
            return None
        ran = self._ran_by_inputs.get(keys)
        if ran is None:
            ran = self._modules_run_on(tracer.invokes)
            self._ran_by_inputs = {keys: ran}   # (one trace's: keys are never reused)
        return [p for p, _ in self._model.named_modules() if p in ran]

    def _modules_run_on(self, prompts: Sequence[tuple[tuple[int, ...], ...]]) -> set[str]:
        """Paths of the modules a forward over these invokes' inputs calls."""
        def forward(model: nn.Module) -> None:
            args, kwargs = self._feed(prompts, None, torch.device("meta"))
            model(*args, **kwargs)

        return self._modules_run_by(forward)

    def __repr__(self) -> str:
        return repr(self._model)


def _call_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Call | None:
    if not args and not kwargs:
        return None
    return _Call(tuple(args), dict(kwargs))


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def batch_size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """Rows of one invoke: dim 0 of its first tensor argument (1 without any)."""
    for t in _tensors((args, kwargs)):
        if t.dim() > 0:
            if t.shape[0] == 0:
                raise TracingError("an invoke's input has 0 rows")
            return int(t.shape[0])
    return 1


def _join(values: list[Any], where: str) -> Any:
    first = values[0]
    if isinstance(first, torch.Tensor) and first.dim() > 0:
        try:
            return torch.cat([torch.as_tensor(v).to(first.device) for v in values])
        except RuntimeError as e:
            raise TracingError(f"cannot batch the invokes' {where} along dim 0 ({e}); pass "
                               "NNsight(module, batch=...) to join them") from None
    if isinstance(first, (list, tuple)) and not isinstance(first, str):
        if any(not isinstance(v, (list, tuple)) or len(v) != len(first) for v in values):
            raise TracingError(f"the invokes' {where} differ in structure")
        items = [_join([v[k] for v in values], f"{where}[{k}]") for k in range(len(first))]
        return type(first)(*items) if hasattr(first, "_fields") else type(first)(items)
    if isinstance(first, dict):
        if any(not isinstance(v, dict) or v.keys() != first.keys() for v in values):
            raise TracingError(f"the invokes' {where} differ in keys")
        return {k: _join([v[k] for v in values], f"{where}[{k!r}]") for k in first}
    for v in values[1:]:
        same = v is first or (isinstance(v, torch.Tensor) and torch.equal(v, first)) \
            or (not isinstance(v, torch.Tensor) and v == first)
        if not same:
            raise TracingError(f"the invokes' {where} differ ({first!r} vs {v!r}) and are not "
                               "batchable tensors; pass NNsight(module, batch=...)")
    return first


def concat_inputs(parts: list[Inputs]) -> Inputs:
    """The default batching rule: every argument joined along dim 0 across invokes."""
    lens = {len(a) for a, _ in parts}
    if len(lens) != 1:
        raise TracingError("the invokes pass different numbers of positional arguments")
    args = tuple(_join([a[k] for a, _ in parts], f"argument {k}") for k in range(lens.pop()))
    keys = parts[0][1].keys()
    if any(kw.keys() != keys for _, kw in parts):
        raise TracingError("the invokes pass different keyword arguments")
    kwargs = {k: _join([kw[k] for _, kw in parts], f"argument {k!r}") for k in keys}
    return args, kwargs


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_to(v, device) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value

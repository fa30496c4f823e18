"""The one custom op through which every hooked point reaches the plugin, compiled or eager.

vLLM compiles its model with torch.compile (and captures CUDA graphs on GPUs). Python forward
hooks installed *before* the first forward are traced into the compiled graph, but whatever
Python they run is traced once and then frozen. So each hook only calls
``torch.ops.vinterp.point(x, y, pid)``: an opaque op that mutates the point's tensors in place
(``x``, plus ``y`` = the residual of a fused decoder layer) and whose Python body runs on every
step, in eager mode, inside inductor's code on CPU, and between graph pieces on GPUs (it is
listed in ``compilation_config.splitting_ops``, see :func:`cuda_compilation_config`).

``pid`` is a 2-element int64 CPU tensor ``[engine, point]`` held as a buffer on the hooked
module, not a Python constant: vLLM compiles identical layer subgraphs once, and a per-layer
constant would make every layer's graph distinct.

Example::

    ids = PointIds()
    install_point_hooks(model, [("model.layers.0", True)], ids, lambda p, x, y: ...)
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

from vinterp_vllm.events import _pair, _tensor

#: the op's qualified name, as ``compilation_config.splitting_ops`` lists it
OP_NAME = "vinterp::point"
#: the torch.library fragment the op lives in (kept alive for the process's lifetime)
_LIB: Any = None
#: engine id -> its point callback (``(point index, x, y) -> None``); weak: engines come and go
_ENGINES: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
_NEXT_ENGINE = itertools.count(1)


def _point(x: torch.Tensor, y: torch.Tensor | None, pid: torch.Tensor) -> None:
    engine, index = pid.tolist()
    target = _ENGINES.get(engine)
    if target is not None:
        target.at_point(index, x, y)


def _point_fake(x: torch.Tensor, y: torch.Tensor | None, pid: torch.Tensor) -> None:
    return None


def _slots_fake(capbuf: torch.Tensor, pre: torch.Tensor, before: torch.Tensor,
                post: torch.Tensor, after: torch.Tensor, flags: torch.Tensor,
                bad: torch.Tensor, reached: torch.Tensor, tid: torch.Tensor) -> None:
    return None


def register_op() -> None:
    """Define ``vinterp::point`` and ``vinterp::slots`` once per process (idempotent).

    ``slots`` is the table path's capture write (``tables.write_slots``): a copy into a
    persistent buffer, so unlike ``point`` it may be captured in a full CUDA graph.
    """
    global _LIB
    if _LIB is not None:
        return
    from torch.library import Library
    from vllm.utils.torch_utils import direct_register_custom_op

    from vinterp_vllm.tables import write_slots

    lib = Library("vinterp", "FRAGMENT")
    direct_register_custom_op("point", _point, mutates_args=["x", "y"], fake_impl=_point_fake,
                              target_lib=lib)
    direct_register_custom_op("slots", write_slots, mutates_args=["capbuf", "flags", "reached"],
                              fake_impl=_slots_fake, target_lib=lib)
    _LIB = lib


class PointIds:
    """Registers one engine's point sink and hands out its point ids."""

    def __init__(self) -> None:
        self.engine = next(_NEXT_ENGINE)

    def bind(self, sink: Any) -> None:
        """Route this engine's points to ``sink.at_point(index, x, y)`` (held weakly)."""
        _ENGINES[self.engine] = sink

    def pid(self, index: int) -> torch.Tensor:
        return torch.tensor([self.engine, index], dtype=torch.long)


def _hook_tensors(pair: bool, args: tuple, kwargs: dict, out: Any
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The tensors a point's op call carries: a fused layer's (hidden, residual), else the one
    tensor (with any leading batch dim of 1 kept: the plugin strips it)."""
    if pair:
        return _pair(args, kwargs, out)
    return _tensor("tensor", args, kwargs, out), None


def _replaced(out: Any, pair: bool, x: torch.Tensor, y: torch.Tensor | None) -> Any:
    """A module's output with its point tensors replaced (see ``_hook_tensors``)."""
    if pair:
        return (x, y, *out[2:])
    if isinstance(out, (tuple, list)):
        return type(out)((x, *out[1:]))
    return x


def install_point_hooks(model: torch.nn.Module, points: Sequence[tuple[str, str, bool]],
                        ids: PointIds, active: Callable[[int], bool],
                        traced: Callable[[int], bool] = lambda i: True,
                        tables: dict[str, torch.Tensor] | None = None,
                        tabled: Callable[[int], int | None] = lambda i: None) -> None:
    """Hook ``(module name, side, pair)`` points of ``model`` to call the op; point ``i`` of
    ``points`` gets index ``i``.

    ``active(i)`` lets eager steps skip the op call for points nothing uses this step. While
    torch.compile traces, the hooks of points with ``traced(i)`` emit the op (the graph must
    serve any future step) and the others emit nothing: those points work in eager steps only.
    With ``tables`` (``tables.StepTables.shared``), output points with ``tabled(i)`` (their
    column of the tables) trace the table update into the graph instead and return the
    updated output (``tables.table_rows``; captures leave through ``vinterp::slots``).
    """
    from vinterp_vllm.tables import table_rows

    register_op()
    op, slots_op = torch.ops.vinterp.point, torch.ops.vinterp.slots
    mods = dict(model.named_modules())
    for index, (name, side, pair) in enumerate(points):
        mod = mods[name]
        buf = f"_vinterp_{side}_pid"
        mod.register_buffer(buf, ids.pid(index), persistent=False)
        column = tabled(index) if tables is not None else None
        tbuf = f"_vinterp_{side}_tid"
        if column is not None:
            device = tables["rowmap"].device  # type: ignore[index]
            mod.register_buffer(tbuf, torch.tensor([column], device=device), persistent=False)
            for tname, t in tables.items():  # type: ignore[union-attr]
                mod.register_buffer(f"_vinterp_{tname}", t, persistent=False)

        def call(mod: Any, args: tuple, kwargs: dict, out: Any, *, index: int = index,
                 pair: bool = pair, buf: str = buf, tbuf: str = tbuf,
                 column: int | None = column) -> Any:
            if torch.compiler.is_compiling():
                if column is not None:
                    x, y = _hook_tensors(pair, args, kwargs, out)
                    batch = x.dim() == 3       # vLLM's Transformers backend: [1, tokens, H]
                    new_x, new_y, before, after, pre, post, bad = table_rows(
                        x[0] if batch else x, y[0] if batch and y is not None else y,
                        getattr(mod, tbuf), mod._vinterp_rowmap, mod._vinterp_vec,
                        mod._vinterp_coef)
                    slots_op(mod._vinterp_capbuf, pre, before, post, after,
                             mod._vinterp_flags, bad, mod._vinterp_reached, getattr(mod, tbuf))
                    if batch:
                        new_x = new_x.unsqueeze(0)
                        new_y = None if new_y is None else new_y.unsqueeze(0)
                    return _replaced(out, pair, new_x, new_y)
                if not traced(index):
                    return
            elif not active(index):
                return
            x, y = _hook_tensors(pair, args, kwargs, out)
            op(x, y, getattr(mod, buf))

        if side == "input":
            assert column is None, "the table path serves output points only"
            mod.register_forward_pre_hook(
                lambda mod, args, kwargs, call=call: call(mod, args, kwargs, None),
                with_kwargs=True)
        else:
            mod.register_forward_hook(call, with_kwargs=True)


def cuda_compilation_config(user: dict[str, Any] | str | None,
                            graph_points: str = "residual") -> dict[str, Any]:
    """vLLM's ``compilation_config`` for the plugin on CUDA.

    With the op in the graph (``graph_points`` ``all`` / ``residual``): graph pieces split at
    the op, so its Python runs every step between piecewise CUDA graphs (a full graph would
    replay the op's first capture forever); a user setting that would freeze it is refused.
    With ``tables`` the graph holds only tensor math on persistent tables: vLLM's own
    settings (full CUDA graphs for decode included) stand.

    Example::

        >>> cuda_compilation_config(None)["cudagraph_mode"]  # doctest: +SKIP
        'PIECEWISE'
    """
    import json

    from vllm.config.compilation import CompilationConfig

    if isinstance(user, str):   # as `vllm serve --compilation-config '{...}'` passes it
        user = json.loads(user)
    if user is not None and not isinstance(user, dict):
        raise ValueError("with the vllm backend pass compilation_config as a dict (vinterp "
                         "adds its op to splitting_ops), not a "
                         f"{type(user).__name__}")
    cfg = dict(user or {})
    if graph_points == "tables":
        return cfg
    mode = str(cfg.get("cudagraph_mode", "PIECEWISE")).upper()
    if "FULL" in mode:
        raise ValueError(f"compilation_config cudagraph_mode={mode!r} would replay vinterp's "
                         "per-step interventions from their first capture; use PIECEWISE "
                         "(the default vinterp sets), additional_config={'vinterp': "
                         "{'graph_points': 'tables'}} (full graphs, steering and captures in "
                         "the graph) or enforce_eager=True")
    cfg["cudagraph_mode"] = "PIECEWISE"
    ops = list(cfg.get("splitting_ops") or CompilationConfig._attention_ops)
    if OP_NAME not in ops:
        ops.append(OP_NAME)
    cfg["splitting_ops"] = ops
    return cfg

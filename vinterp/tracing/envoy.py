"""Envoys: the module tree users address inside a trace, mirroring the HF tree exactly.

``model.transformer.h[5]`` or ``model.model.layers[5].self_attn`` walk the real HF modules;
the standard aliases (``model.layers[i]``, ``.attn``, ``.mlp``, ``model.embed``,
``model.final_norm``, ``model.lm_head``) resolve through the architecture table to the same
real paths, so the graph only ever holds HF module paths. ``.output``, ``.input`` and
``.inputs`` read a point (a proxy); assigning to them replaces the value.

Example::

    with model.trace("Hello") as tracer:
        model.layers[3].attn.output[0][:] = 0       # same node as model.model.layers[3].self_attn
"""

from __future__ import annotations

import difflib
import operator
import re
from typing import TYPE_CHECKING, Any

from torch import nn

from vinterp.tracing.errors import TracingError

if TYPE_CHECKING:
    from vinterp.language_model import LanguageModel
    from vinterp.tracing.proxy import Proxy

POINTS = ("output", "input", "inputs")
#: points computed inside attention that are not modules of their own (see backends/hf).
VIRTUAL_ATTENTION = ("probs",)


class Envoy:
    """One module of the user's model inside a trace (or a virtual point such as ``probs``)."""

    __slots__ = ("_lm", "_path", "_module")

    def __init__(self, lm: LanguageModel, path: str, module: nn.Module | None) -> None:
        object.__setattr__(self, "_lm", lm)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_module", module)

    # ------------------------------------------------------------------ points
    def _read(self, kind: str) -> Proxy:
        return self._lm._current_tracer(f"{self._name()}.{kind}").read(self._path, kind)

    @property
    def output(self) -> Proxy:
        """The module's output at this point of the forward (HF-shaped, per invoke)."""
        return self._read("output")

    @property
    def input(self) -> Proxy:
        """The first argument of the module's forward (positional or keyword)."""
        return self._read("input")

    @property
    def inputs(self) -> Proxy:
        """``(args, kwargs)`` of the module's forward."""
        return self._read("inputs")

    def __call__(self, *args: Any, **kwargs: Any) -> Proxy:
        """Call this module on values inside a trace, e.g. the logit lens
        ``model.lm_head(model.model.norm(h))``: an IR node naming the module by its path."""
        tracer = self._lm._current_tracer(f"{self._name()}(...)")
        return tracer.call_module(self._path, args, kwargs)

    def skip(self, value: Any) -> None:
        """nnsight's ``module.skip(value)``: the module's output becomes ``value``.

        (The module still runs and its result is discarded, so the values are nnsight's;
        in generation its attention cache still holds what the module computed.)"""
        self._lm._current_tracer(f"{self._name()}.skip").write(self._path, "output", value)

    @property
    def source(self) -> Any:
        """nnsight's operation-level access (``.source``) is refused: see the message."""
        where = "on the vllm backend, whose modules are vLLM's own fused kernels" \
            if self._lm.backend_name == "vllm" else "in vinterp"
        raise TracingError(
            f"{self._name()}.source (operation-level access inside a module's forward) is "
            f"not available {where}: the IR names module points, not lines of a forward. "
            "Read or edit a submodule's .input/.output instead (e.g. .self_attn.o_proj.input "
            "for the attention heads before the output projection)")

    def _virtual(self, name: str) -> str | None:
        if name in VIRTUAL_ATTENTION and self._lm._is_attention(self._path):
            return f"{self._path}.{name}"
        return None

    def __setattr__(self, name: str, value: Any) -> None:
        if name in POINTS:
            self._lm._current_tracer(f"{self._name()}.{name}").write(self._path, name, value)
            return
        virtual = self._virtual(name)
        if virtual is not None:
            self._lm._current_tracer(f"{self._name()}.{name}").write(virtual, "output", value)
            return
        raise TracingError(f"cannot set {name!r} on {self._name()}; only .output, .input and "
                           ".inputs can be assigned")

    # ------------------------------------------------------------------ navigation
    def _name(self) -> str:
        return f"model.{self._path}" if self._path else "model"

    def _child(self, name: str) -> Envoy:
        path = f"{self._path}.{name}" if self._path else name
        module = self._module
        if module is not None:
            sub = module._modules.get(name)
            if sub is not None:
                return Envoy(self._lm, path, sub)
            alias = self._lm._layer_alias(self._path, name)
            if alias is not None:
                return self._child(alias) if "." not in alias else self._descend(alias)
            renamed = self._lm._renamed(self._path, name)
            if renamed is not None:
                return self._lm._root._descend(renamed)
        raise AttributeError(self._missing(name))

    def _descend(self, rel: str) -> Envoy:
        env: Envoy = self
        for part in rel.split("."):
            env = env[int(part)] if part.isdigit() else env._child(part)
        return env

    def _missing(self, name: str) -> str:
        options = list(self._module._modules) if self._module is not None else []
        options = list(dict.fromkeys(options + list(self._lm._layer_aliases_of(self._path))))
        close = difflib.get_close_matches(name, options, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        if name == "next":   # nnsight <= 0.4: module.next() moved to the next generation step
            hint = ("; nnsight 0.4's module.next() is tracer.next() here, or a loop over "
                    "tracer.iter[...] (see the README's From nnsight)")
        return (f"{self._name()} has no module {name!r}{hint} (its children: "
                f"{', '.join(options) or 'none'})")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if name == "generator" and not self._path and (
                self._module is None or "generator" not in self._module._modules):
            # nnsight's `model.generator.output`: the generated ids (not an HF module)
            return self._lm._current_tracer("model.generator").generator
        virtual = self._virtual(name)
        if virtual is not None:
            # attention probabilities [batch, heads, q, k]: a value, not a module
            return self._lm._current_tracer(f"{self._name()}.{name}").read(virtual, "output")
        try:
            return self._child(name)
        except AttributeError:
            # plain attributes of the real module (config, head_dim, ...) pass through
            if self._module is not None and hasattr(self._module, name) \
                    and not isinstance(getattr(self._module, name), nn.Module):
                return getattr(self._module, name)
            raise

    def __getitem__(self, index: int | slice) -> Any:
        """``layers[3]``, ``layers[-1]``, ``layers[np.int64(3)]``; ``layers[:4]`` is a list of
        them (nnsight users loop over a slice of the layers)."""
        module = self._module
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            raise TypeError(f"{self._name()} is not a list of modules")
        n = len(module)
        if isinstance(index, slice):
            return [self._child(str(i)) for i in range(n)[index]]
        try:
            i = operator.index(index)   # ints, and numpy's or torch's integer scalars
        except TypeError:
            raise TypeError(f"{self._name()} takes an integer or a slice, not "
                            f"{type(index).__name__} {index!r}") from None
        if not -n <= i < n:
            raise IndexError(f"{self._name()} has {n} modules; index {i} is out of range")
        return self._child(str(i % n))

    def __len__(self) -> int:
        return len(self._module) if self._module is not None else 0

    def __iter__(self) -> Any:
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return repr(self._module) if self._module is not None else f"<virtual point {self._path}>"


_LAYER_RE_CACHE: dict[str, re.Pattern[str]] = {}


def layer_index(layers_path: str, path: str) -> int | None:
    """If ``path`` is ``<layers_path>.<i>``, return ``i``."""
    pat = _LAYER_RE_CACHE.get(layers_path)
    if pat is None:
        pat = _LAYER_RE_CACHE[layers_path] = re.compile(re.escape(layers_path) + r"\.(\d+)$")
    m = pat.match(path)
    return int(m.group(1)) if m else None

"""``tracer.cache()``'s result: saved module values keyed and navigated as nnsight's.

Separate from the tracer: it is a plain container the tracer fills after the run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from vinterp.language_model import LanguageModel


class _CacheEntry:
    """One cached module: ``.output``, ``.inputs`` (``(args, kwargs)``) and ``.input``."""

    __slots__ = ("output", "inputs")

    def __init__(self) -> None:
        self.output: Any = None
        self.inputs: Any = None

    @property
    def input(self) -> Any:
        """The first input: the first positional argument, else the first keyword one."""
        if self.inputs is None:
            return None
        args, kwargs = self.inputs
        values = list(args) + list(kwargs.values())
        return values[0] if values else None

    def __repr__(self) -> str:
        return f"<cache entry output={_short(self.output)}>"


def _short(v: Any) -> str:
    return f"tensor{list(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__


class Cache(dict):  # type: ignore[type-arg]
    """``tracer.cache()``'s result, keyed and navigated as nnsight's: ``"model." + path``.

    Example::

        with model.trace("Hello") as tracer:
            cache = tracer.cache()
        cache["model.model.layers.0"].output      # by key
        cache.model.layers[0].output              # by navigation (HF names and aliases)
    """

    def __init__(self, lm: LanguageModel) -> None:
        super().__init__()
        self._lm = lm

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        root = _CacheView(self, self._lm._root)
        # as nnsight's: `cache.model` is the model itself (keys start with "model"), and
        # `cache.transformer.h[0]` is short for `cache.model.transformer.h[0]`
        return root if name == "model" else root._go(name)


class _CacheView:
    """A module of the model inside a :class:`Cache` (``cache.model.transformer.h[0]``)."""

    def __init__(self, cache: Cache, envoy: Any) -> None:
        self._cache, self._envoy = cache, envoy

    def _go(self, name: str) -> Any:
        return _CacheView(self._cache, getattr(self._envoy, name))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name in ("output", "inputs", "input"):
            path = self._envoy._path
            key = f"model.{path}" if path else "model"
            if key not in self._cache:
                raise KeyError(f"{key!r} was not cached")
            return getattr(self._cache[key], name)
        return self._go(name)

    def __getitem__(self, index: int) -> _CacheView:
        return _CacheView(self._cache, self._envoy[index])

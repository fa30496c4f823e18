"""A model's module tree without its weights: the HF model built on the meta device.

What checks of module paths need where the real model lives elsewhere (inside a vLLM engine,
whose modules are vLLM's own, or behind a server): the names users write
(``model.layers.8.mlp``) are the HF model's.

Example::

    >>> names = module_names(resolve_model("tiny-llama"))       # doctest: +SKIP
    >>> "model.layers.0.mlp" in names, "model.layers.99" in names  # doctest: +SKIP
    (True, False)
"""

from __future__ import annotations

import pathlib
from typing import Any

import torch
from torch import nn


def meta_model(config: Any) -> nn.Module:
    """The HF causal LM for ``config`` with every tensor on the meta device (no memory, no
    weights read), in eval mode."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def module_names(path: str | pathlib.Path) -> frozenset[str]:
    """Every module path of the HF model in ``path`` (``""`` is the model itself)."""
    from transformers import AutoConfig

    model = meta_model(AutoConfig.from_pretrained(path))
    return frozenset(name for name, _ in model.named_modules())


def unknown_module(module: str, names: frozenset[str], layers: str) -> str | None:
    """Why ``module`` is not in ``names`` (what the model has instead), or ``None`` if it is.
    ``layers``: the architecture's layer list (``model.layers``), for the hint."""
    if not names or module in names:
        return None
    count = sum(1 for n in names if n.startswith(layers + ".") and n.count(".") ==
                layers.count(".") + 1)
    first = f"{layers}.0"
    children = sorted({n[len(first) + 1:].split(".")[0] for n in names
                       if n.startswith(first + ".")})
    return (f"the model has no module {module!r}: it has {count} layers ({layers}.0 .. "
            f"{layers}.{count - 1}), each with {', '.join(children)}; print(model) in the "
            "library lists every module")

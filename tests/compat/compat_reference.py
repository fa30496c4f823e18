"""Raw PyTorch references for the compatibility tests: plain forward hooks on the HF model.

Nothing here uses vinterp's tracing: each helper drives ``transformers``' own ``generate`` (or
forward) with ``register_forward_hook`` / ``register_forward_pre_hook``, counting generation
steps with a pre-hook on the root module (one root forward per generated token).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class RawGeneration:
    """What a raw hooked ``generate`` produced: the ids and what each hook captured per step."""

    ids: torch.Tensor
    captured: dict[str, list[torch.Tensor]] = field(default_factory=dict)


def raw_generate(model: nn.Module, prompt_ids: list[int], n_new: int, pad_id: int, *,
                 capture: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
                 edits: dict[str, Callable[[int, torch.Tensor], torch.Tensor | None]]
                 | None = None) -> RawGeneration:
    """Greedy ``model.generate`` of ``n_new`` tokens (EOS ignored) with hooks.

    ``capture``: module path -> function of its output; the result is recorded once per step.
    ``edits``: module path -> ``fn(step, output)`` returning a replacement output (or None).
    Edits of a module run before its capture (hooks fire in registration order).
    """
    mods = dict(model.named_modules())
    step = [-1]
    out = RawGeneration(ids=torch.empty(0))
    handles = [mods[""].register_forward_pre_hook(lambda m, a: step.__setitem__(0, step[0] + 1))]
    for path, fn in (edits or {}).items():
        handles.append(mods[path].register_forward_hook(
            lambda m, a, o, fn=fn: fn(step[0], o)))
    for path, fn in (capture or {}).items():
        out.captured[path] = []
        handles.append(mods[path].register_forward_hook(
            lambda m, a, o, fn=fn, path=path: out.captured[path].append(fn(o).detach().clone())))
    ids = torch.tensor([prompt_ids])
    try:
        with torch.no_grad():
            out.ids = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                     max_new_tokens=n_new, do_sample=False, eos_token_id=None,
                                     pad_token_id=pad_id)[0]
    finally:
        for h in handles:
            h.remove()
    assert step[0] == n_new - 1, "one root forward per generated token"
    return out

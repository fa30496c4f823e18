"""Calling the model's final norm and LM head on values inside vLLM (``call_module`` nodes).

The logit lens calls the model's own top-level modules on a traced value:
``model.lm_head(model.model.norm(h))`` (Llama, Mistral, Qwen2), ``model.lm_head(
model.transformer.ln_f(h))`` (GPT-2). Users name HF paths; here they become vLLM's modules:

* the final norm (the architecture table's ``final_norm``) -> vLLM's final norm module, called
  without a residual (a fused norm then returns the normed tensor only);
* the LM head (``lm_head``) -> ``model.compute_logits``, vLLM's own LM head plus logits
  processor (tied embeddings, logit scaling and vocabulary padding handled as when sampling).

Both are called through ``.forward`` so the plugin's hooks on the final norm do not fire: a
call on a value is not the forward reaching that module. Values keep HF's shapes
(``[..., hidden]`` in, ``[..., hidden]`` / ``[..., vocab]`` out). Other submodules are
refused with :class:`~vinterp_vllm.points.UnsupportedPoint` naming what works.

Example::

    >>> from vinterp.models.architectures import for_model_type
    >>> call_target(for_model_type("gpt2"), "transformer.ln_f")
    'final_norm'
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from vinterp.backends.base import NOT_ON_VLLM
from vinterp.models.architectures import Architecture, for_model_type
from vinterp_vllm.points import UnsupportedPoint

#: what a ``call_module`` node may call inside vLLM
CALL_TARGETS = ("final_norm", "lm_head")


def call_target(arch: Architecture, path: str) -> str:
    """Which callable top-level module the HF module ``path`` is: ``"final_norm"`` or
    ``"lm_head"``; raises :class:`UnsupportedPoint` for anything else.

    Example::

        >>> from vinterp.models.architectures import for_model_type
        >>> call_target(for_model_type("llama"), "lm_head")
        'lm_head'
    """
    if arch.vllm is not None:
        if path == arch.final_norm:
            return "final_norm"
        if path == arch.lm_head:
            return "lm_head"
    raise UnsupportedPoint(
        f"calling model.{path or '<root>'}(...) on values is {NOT_ON_VLLM}: inside vLLM only "
        f"the final norm (model.{arch.final_norm}) and the LM head (model.{arch.lm_head}) can be "
        f"called on traced values (the logit lens). Save the value and call other modules "
        f"after the block, or use backend='hf'")


def _flat(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as vLLM's ``[tokens, hidden]``, contiguous, in the model's dtype."""
    return x.reshape(-1, x.shape[-1]).to(dtype).contiguous()


class ModuleCalls:
    """``path -> callable`` for ``call_module`` nodes on one vLLM model (see module doc).

    Example (what the plugin does for a request's graph runner)::

        calls = ModuleCalls(vllm_model)
        lens = calls("lm_head")(calls("model.norm")(h))     # h: [1, seq, hidden]
    """

    def __init__(self, model: Any, arch: Architecture | None = None) -> None:
        self.model = model
        if arch is None:
            arch = for_model_type(model.config.model_type)
            if arch.vllm is None:
                raise UnsupportedPoint(f"model type {arch.model_types[0]!r} has no vLLM "
                                       f"mapping; {NOT_ON_VLLM}")
            arch = arch.in_vllm(name for name, _ in model.named_modules())
        self.arch = arch
        vm = arch.vllm
        self._norm = dict(model.named_modules())[vm.final_norm]
        self._dtype = next(model.parameters()).dtype
        self._batch_dim = vm.batch_dim

    def __call__(self, path: str) -> Callable[..., torch.Tensor]:
        target = call_target(self.arch, path)
        return self.final_norm if target == "final_norm" else self.lm_head

    def final_norm(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """The model's final norm of ``x`` (any leading shape), hooks silent."""
        _no_kwargs("final norm", kwargs)
        if self._batch_dim:   # an HF module (vLLM's Transformers backend): HF shapes
            out = self._norm.forward(x.to(self._dtype))
        else:
            out = self._norm.forward(_flat(x, self._dtype))
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.reshape(x.shape)

    def lm_head(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Logits of ``x`` (any leading shape) through vLLM's LM head and logits processor."""
        _no_kwargs("LM head", kwargs)
        logits = self.model.compute_logits(_flat(x, self._dtype))
        return logits.reshape(*x.shape[:-1], logits.shape[-1])


def _no_kwargs(what: str, kwargs: dict[str, Any]) -> None:
    if kwargs:
        raise TypeError(f"the {what} takes one value inside vLLM, got keyword arguments "
                        f"{sorted(kwargs)}; call it as module(x)")

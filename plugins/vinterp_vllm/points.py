"""Where each HF point (module path + output/input) lives in vLLM's model, and how to read it.

Users address the Hugging Face module tree; vLLM's modules differ (fused residual adds,
fused q/k/v, logits only at sampled rows). :func:`resolve_point` turns an HF point into a
:class:`VllmPoint`: which vLLM module to hook, which side (output or input), and what shape
of value it carries there. Unsupported points raise :class:`UnsupportedPoint` naming why.

Example::

    >>> from vinterp.models.architectures import for_model_type
    >>> p = resolve_point(for_model_type("llama"), "model.layers.3", "output")
    >>> (p.vllm_module, p.side, p.value)
    ('model.layers.3', 'output', 'residual')
"""

from __future__ import annotations

from dataclasses import dataclass

from vinterp.backends.base import NOT_ON_VLLM
from vinterp.models.architectures import Architecture

#: value kinds at a point: ``residual`` = the (hidden + residual) sum of a fused layer;
#: ``tensor`` = a plain tensor; ``attn`` = a tensor presented as HF's ``(out, None)``;
#: ``norm`` = a fused final norm (returns ``(normed, residual)``; a final norm that returns a
#: plain tensor is ``tensor``); ``logits`` / ``model_output`` = computed from the final norm's
#: rows on demand.
VALUE_KINDS = ("residual", "tensor", "attn", "norm", "logits", "model_output")
#: the value kinds computed from the final norm's rows on demand (vLLM's logits are only
#: where it samples): the logits, and the model output that holds them
LOGIT_VALUES = frozenset({"logits", "model_output"})


class UnsupportedPoint(ValueError):
    """A point that the vLLM backend cannot serve; the message says what to use instead."""


@dataclass(frozen=True)
class VllmPoint:
    """One HF point mapped into vLLM: hook ``vllm_module`` on ``side``; value kind ``value``."""

    hf_module: str
    hf_kind: str
    vllm_module: str
    side: str       # "output" (forward hook) or "input" (forward pre-hook)
    value: str      # one of VALUE_KINDS
    #: the hooked tensors are ``[1, tokens, hidden]`` (see ``VllmMapping.batch_dim``)
    batch_dim: bool = False

    @property
    def key(self) -> tuple[str, str]:
        """The HF point, as the IR names it."""
        return (self.hf_module, self.hf_kind)


@dataclass(frozen=True)
class _Maker:
    """Builds the :class:`VllmPoint` s of one HF point (the fields every mapping shares)."""

    module: str
    kind: str
    batch_dim: bool

    def __call__(self, vllm_module: str, side: str, value: str) -> VllmPoint:
        return VllmPoint(self.module, self.kind, vllm_module, side, value, self.batch_dim)


def _unsupported(module: str, kind: str, why: str) -> UnsupportedPoint:
    return UnsupportedPoint(f"{module or 'model'}.{kind} is {NOT_ON_VLLM} ({why})")


def resolve_point(arch: Architecture, module: str, kind: str) -> VllmPoint:
    """Map the HF point ``(module, kind)`` of a model with table ``arch`` into vLLM."""
    vm = arch.vllm
    if vm is None:
        raise UnsupportedPoint(
            f"model type {arch.model_types[0]!r} has no vLLM mapping in "
            f"vinterp/models/architectures/; {NOT_ON_VLLM}")
    if kind == "inputs":
        raise _unsupported(module, kind, "vLLM calls modules with different arguments than HF; "
                                         "use .input")
    point = _Maker(module, kind, vm.batch_dim)
    if module == "":
        if kind != "output":
            raise _unsupported(module, kind, "the model's input is token ids")
        return point(vm.final_norm, "output", "model_output")
    if module == arch.lm_head:
        if kind != "output":
            raise _unsupported(module, kind, "read model.final_norm.output instead")
        return point(vm.final_norm, "output", "logits")
    if module == arch.embed:
        if kind != "output":
            raise _unsupported(module, kind, "the embedding's input is token ids")
        return point(vm.embed, "output", "tensor")
    if module == arch.final_norm:
        if kind == "input":
            raise _unsupported(module, kind, "read the last layer's output instead")
        return point(vm.final_norm, "output", "norm" if vm.norm_returns_pair else "tensor")
    prefix = arch.layers + "."
    if module.startswith(prefix):
        head, _, rest = module[len(prefix):].partition(".")
        if not head.isdigit():
            raise _unsupported(module, kind, "not a decoder layer path")
        layer = f"{vm.layers}.{head}"
        if rest == "":
            return point(layer, kind, "residual" if vm.residual_pair
                             else "tensor")
        if rest == arch.attn:
            if kind == "input":
                return point(f"{layer}.{vm.attn}", "input", "tensor")
            return point(f"{layer}.{vm.attn}", "output", "attn")
        if rest == arch.mlp:
            return point(f"{layer}.{vm.mlp}", kind, "tensor")
        raise _unsupported(module, kind, "vLLM fuses this module (q/k/v projections, "
                                         "attention probabilities and norms are not separate "
                                         "points); supported: layer input/output, attn and mlp "
                                         "output, embeddings, final norm, logits")
    raise _unsupported(module, kind, "no such point in vLLM's model")

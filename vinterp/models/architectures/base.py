"""The shape of an architecture table: where the standard points live in the HF module tree.

Each supported architecture is one :class:`Architecture` value in its own module; nothing
else in vinterp branches on the model type. Backends read these tables to map the standard
aliases (``model.layers[i]``, ``.attn``, ``.mlp``, ``model.embed``, ``model.final_norm``,
``model.lm_head``, ``model.logits``) onto real module paths.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class VllmMapping:
    """Where the standard points live inside vLLM's implementation of an architecture.

    vLLM fuses the residual add into the next norm: a decoder layer returns
    ``(hidden_states, residual)`` and the residual stream users mean (HF's layer output) is
    their sum. Paths are relative to vLLM's top-level ``*ForCausalLM`` module.

    Example::

        >>> from vinterp.models.architectures import for_model_type
        >>> for_model_type("llama").vllm.layers
        'model.layers'
    """

    layers: str = "model.layers"
    attn: str = "self_attn"
    mlp: str = "mlp"
    embed: str = "model.embed_tokens"
    #: the norm before the LM head (see ``norm_returns_pair`` for what it returns).
    final_norm: str = "model.norm"
    #: a decoder layer takes ``(positions, hidden, residual)`` and returns
    #: ``(hidden, residual)``: the residual stream is ``hidden + residual``. ``False``: a layer
    #: takes and returns the residual stream itself (GPT-2, GPT-NeoX).
    residual_pair: bool = True
    #: the final norm returns ``(normed, residual)`` (fused add); ``False``: a plain tensor.
    norm_returns_pair: bool = True
    #: values carry HF's leading batch dimension of 1 (``[1, tokens, hidden]``): vLLM runs the
    #: HF modules themselves through its Transformers backend (e.g. GPT-NeoX), which adds it.
    batch_dim: bool = False


@dataclass(frozen=True)
class Architecture:
    """Where the standard points of one HF architecture live.

    Example::

        >>> from vinterp.models.architectures import for_model_type
        >>> for_model_type("llama").layer(5)
        'model.layers.5'
    """

    model_types: tuple[str, ...]
    layers: str            # the ModuleList of decoder layers
    attn: str              # attention, relative to a layer
    mlp: str               # MLP, relative to a layer
    embed: str             # token embedding
    final_norm: str        # norm before the LM head
    lm_head: str           # LM head (its output is the logits)
    #: the attention module's dropout applied to probabilities, relative to ``attn`` (GPT-2).
    attn_dropout: str | None = None
    #: how the points map into vLLM's model; ``None``: the vllm backend refuses this model.
    vllm: VllmMapping | None = None
    #: other mappings for vLLM versions that build the model differently (e.g. a native
    #: implementation in one release, the Transformers backend in another); the plugin uses the
    #: first of ``vllm`` and these whose modules the loaded model has (:meth:`in_vllm`).
    vllm_alternatives: tuple[VllmMapping, ...] = ()

    def in_vllm(self, module_names: Iterable[str]) -> Architecture:
        """This table with ``vllm`` set to the mapping that fits a loaded vLLM model, given its
        module names (``dict(model.named_modules())``); raises ``ValueError`` when none does.

        Example::

            >>> from vinterp.models.architectures import for_model_type
            >>> names = {"gpt_neox.layers", "gpt_neox.embed_in", "gpt_neox.final_layer_norm"}
            >>> for_model_type("gpt_neox").in_vllm(names).vllm.layers
            'gpt_neox.layers'
        """
        names = set(module_names)
        candidates = ((self.vllm,) if self.vllm else ()) + self.vllm_alternatives
        for m in candidates:
            if {m.layers, m.embed, m.final_norm} <= names:
                return replace(self, vllm=m, vllm_alternatives=())
        raise ValueError(
            f"vLLM built this {self.model_types[0]} model with modules vinterp has no mapping "
            f"for (tried layers at {[m.layers for m in candidates]}); add a VllmMapping for "
            f"this vLLM version in vinterp/models/architectures/")

    def layer(self, i: int) -> str:
        """Module path of decoder layer ``i``."""
        return f"{self.layers}.{i}"

    def aliases(self) -> dict[str, str]:
        """Model-level alias → real module path."""
        return {"embed": self.embed, "final_norm": self.final_norm, "lm_head": self.lm_head,
                "layers": self.layers}

    def layer_aliases(self) -> dict[str, str]:
        """Layer-level alias → path relative to the layer."""
        return {"attn": self.attn, "mlp": self.mlp}

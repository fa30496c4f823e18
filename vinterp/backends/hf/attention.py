"""An attention implementation that exposes attention probabilities as intervention points.

transformers 5 eager attention applies dropout functionally, so hooks on GPT-2's
``attn.attn_dropout`` never fire, and no attention hands its probabilities to a hook point.
``vinterp_eager`` computes eager attention, passes the probabilities through the module's own
``attn_dropout`` submodule when it has one (so ``attn.attn_dropout.input`` works as in older
transformers), and reports them as the virtual point ``<attn path>.probs`` (readable and
writable, ``[batch, heads, q, k]``). The HF backend switches to it only for graphs that use
those points; everything else runs the model's default (SDPA) attention.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

IMPLEMENTATION = "vinterp_eager"

#: set by the HF backend while a graph that reads probabilities runs: (module, probs) -> probs
probs_callback: ContextVar[Callable[[nn.Module, torch.Tensor], torch.Tensor] | None] = \
    ContextVar("vinterp_probs_callback", default=None)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)


def vinterp_eager_attention(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention with probabilities routed through hook points (see module doc)."""
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask[:, :, :, : key.shape[-2]]
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    drop = getattr(module, "attn_dropout", None)
    if isinstance(drop, nn.Module):
        weights = drop(weights)
    else:
        weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    callback = probs_callback.get()
    if callback is not None:
        weights = callback(module, weights)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights


AttentionInterface.register(IMPLEMENTATION, vinterp_eager_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, eager_mask)

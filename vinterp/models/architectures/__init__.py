"""Architecture tables, one module per architecture (data, not branches).

Example::

    >>> from vinterp.models.architectures import for_model_type
    >>> for_model_type("gpt2").lm_head
    'lm_head'
"""

from __future__ import annotations

from vinterp.models.architectures import gpt2, gptneox, llama, mistral, qwen2
from vinterp.models.architectures.base import Architecture

ARCHITECTURES: tuple[Architecture, ...] = (
    gpt2.ARCHITECTURE, llama.ARCHITECTURE, mistral.ARCHITECTURE, qwen2.ARCHITECTURE,
    gptneox.ARCHITECTURE,
)
_BY_TYPE = {t: a for a in ARCHITECTURES for t in a.model_types}


def for_model_type(model_type: str) -> Architecture:
    """The table for an HF ``config.model_type``; raises ``KeyError`` naming supported types."""
    try:
        return _BY_TYPE[model_type]
    except KeyError:
        raise KeyError(
            f"no vinterp architecture table for model_type {model_type!r}; supported: "
            f"{sorted(_BY_TYPE)}. Module paths of the HF tree still work; the standard aliases "
            f"(model.layers, .attn, ...) need a table in vinterp/models/architectures/."
        ) from None


__all__ = ["ARCHITECTURES", "Architecture", "for_model_type"]

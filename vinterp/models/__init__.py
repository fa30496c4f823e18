"""Offline model provisioning: known models, the cache, and name resolution.

Example:
    >>> from vinterp.models import resolve_model, list_models
    >>> path = resolve_model("smollm2-135m")  # doctest: +SKIP
"""

from vinterp.models.registry import (
    KNOWN_MODELS,
    ModelNotFoundError,
    list_models,
    model_dir,
    pull,
    resolve_model,
    vinterp_home,
)

__all__ = [
    "KNOWN_MODELS",
    "ModelNotFoundError",
    "list_models",
    "model_dir",
    "pull",
    "resolve_model",
    "vinterp_home",
]

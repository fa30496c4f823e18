"""The Hugging Face backend (hooks on a transformers model)."""

from vinterp.backends.hf.backend import HfBackend

__all__ = ["HfBackend"]

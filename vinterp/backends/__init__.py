"""Backends that execute intervention graphs: ``hf`` (hooks), ``vllm`` (plugin), ``remote``."""

from vinterp.backends.base import NOT_ON_VLLM, Backend, RunResult

__all__ = ["NOT_ON_VLLM", "Backend", "RunResult"]

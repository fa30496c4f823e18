"""The vLLM backend: intervention graphs run per request inside vLLM's continuous batch.

Example::

    backend = VllmBackend(resolve_model("tiny-llama"), max_num_batched_tokens=32)
    result = backend.run(graph)
"""

from vinterp.backends.vllm.backend import VllmBackend

__all__ = ["VllmBackend"]
